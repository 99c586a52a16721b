"""STARFlow-V: the video flow.

The image flow's blocks (FlowBlock, the self-denoiser's layers) over video latents.
What differs from images:

- tokens: a clip (B, T, H, W, C) patchifies to T frames of h*w tokens, frame after
  frame (the frame axis is the slowest), so the deep block is causal over time;
- orders: with `temporal_causal`, a "flipped" block reverses the tokens within each
  frame and keeps the frames in order (without, it reverses the whole sequence);
- frame-local shallow blocks (`shallow_block_local`): every shallow block sees one
  frame at a time, as if each frame were an image of its own;
- positions: text token k of L at (0, 0, k*s/L), token (r, c) of frame f at
  (r*s/sqrt(hw), c*s/sqrt(hw), f): the frame index itself is the third coordinate;
- the self-denoiser attends within a window of frames (`denoiser_window`), shifted
  by `temporal_causal`;
- a local attention window of the deep block (`local_attn_window`) only matters when
  sampling (video_sample.py): the density is causal over the whole clip.

Arrays are channels-last: clips (B, T, H, W, C); tokens (B, N, D) in natural order.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ConfigError, FlowConfig
from .flow import Attention, Denoiser, FlowBlock, IdentityBlock, Layer, check_text, log_normal
from .rope import TEXT_DIMS, THETA, apply_rope


@dataclass
class VideoConfig:
    """What a video flow adds to its FlowConfig."""

    temporal_causal: int = 2  # the self-denoiser's shift of its frame window (the reference's block_causal)
    shallow_block_local: bool = True  # shallow blocks see one frame at a time
    denoiser_window: Optional[int] = None  # frames the self-denoiser looks back (None: all)
    local_attn_window: Optional[int] = None  # frames the deep block attends to when sampling (None: all)
    temporal_scale: float = 1.0  # the VAE's scale of latent frames after the first (the ":0.6" of its name)
    frames: int = 0  # video frames of the training clips (vid_size), 0 when unknown
    fps: int = 16  # their frame rate
    fps_cond: bool = False  # the prompt carries the frame rate
    cond_noise_level: bool = False  # the prompt carries the noise level

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoConfig":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown video config keys {unknown}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self):
        if self.temporal_causal < 0:
            raise ConfigError(f"temporal_causal must be >= 0, not {self.temporal_causal}")
        for name in ("denoiser_window", "local_attn_window"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be at least 1 frame, not {v}")


def check_video_config(cfg: FlowConfig, video: VideoConfig):
    """The combinations the reference allows (its Model's assertions)."""
    video.validate()
    if cfg.model_type != "starflow":
        raise ConfigError("a video flow is a STARFlow model")
    if video.temporal_causal and cfg.seq_order != "L2R":
        raise ConfigError("temporal_causal needs seq_order L2R")
    if video.local_attn_window and not video.shallow_block_local:
        raise ConfigError("local_attn_window needs shallow_block_local")
    if video.shallow_block_local and not cfg.cond_top_only:
        raise ConfigError("shallow_block_local needs cond_top_only")
    if cfg.rope and cfg.txt_size == 0:
        raise ConfigError("a video flow's 3-D positions need text (txt_size > 0)")
    if getattr(cfg, "pretrained_lm", None):
        raise ConfigError("a video flow with a pretrained language model as its deep block is not supported")
    if not cfg.rope:
        raise ConfigError("a video flow needs RoPE (rope: 1): learned positions cover one image")


# -- positions ------------------------------------------------------------------------------


def _video_angles(head_dim: int, h: int, w: int, frames: int, txt_len: int, pt_seq_len: int):
    dim = head_dim // 2 - TEXT_DIMS
    f = THETA ** (-np.arange(0, dim, 2)[: dim // 2] / dim)
    g = THETA ** (-np.arange(TEXT_DIMS) / TEXT_DIMS)
    mean_len = math.sqrt(h * w)
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px = np.tile(r.reshape(-1) / mean_len * pt_seq_len, frames)[:, None]
    py = np.tile(c.reshape(-1) / mean_len * pt_seq_len, frames)[:, None]
    pt = np.repeat(np.arange(frames), h * w)[:, None]
    img = np.concatenate([px * f, py * f, pt * g], axis=1)
    if txt_len == 0:
        return img
    pt_txt = (np.arange(txt_len) / txt_len * pt_seq_len)[:, None]
    txt = np.concatenate([np.zeros((txt_len, dim)), pt_txt * g], axis=1)
    return np.concatenate([txt, img], axis=0)


def video_rope(head_dim: int, h: int, w: int, frames: int, txt_len: int, pt_seq_len: int):
    """(cos, sin), each (txt_len + frames*h*w, head_dim/2) float32: text first, then the frames."""
    a = _video_angles(head_dim, h, w, frames, txt_len, pt_seq_len)
    return mx.array(np.cos(a), dtype=mx.float32), mx.array(np.sin(a), dtype=mx.float32)


# -- orders ------------------------------------------------------------------------------------


def permute(tokens, frames: int, flip: bool):
    """A block's order of tokens (B, frames*F, D): within-frame reversal when flipped
    (its own inverse)."""
    if not flip:
        return tokens
    B, N, D = tokens.shape
    return tokens.reshape(B, frames, N // frames, D)[:, :, ::-1].reshape(B, N, D)


# -- the self-denoiser's frame window ----------------------------------------------------------


def denoiser_mask(txt_len: int, frame: int, frames: int, shift: int, window: Optional[int]):
    """Which keys each query sees (S, S) bool, S = txt_len + frames*frame: every text key,
    and the frames from (query's frame + shift - 1 - window) to (query's frame + shift - 1).
    Text queries count as frame -1 for the lower bound and frame 0 for the upper."""
    S = txt_len + frames * frame
    G = 10000 if window is None else window
    q = np.arange(S)[:, None]
    k = np.arange(S)[None, :]
    kf = (k - txt_len) // frame
    lo = (q - txt_len) // frame + shift - 1 - G
    hi = np.maximum(q - txt_len, 0) // frame + shift - 1
    return mx.array((k < txt_len) | ((kf >= lo) & (kf <= hi)))


class MaskedAttention(Attention):
    """Attention with an explicit boolean mask (True: may attend); no cache."""

    def __call__(self, x, rope=None, cache=None, mask=None):
        if mask is None:
            return super().__call__(x, rope, cache)
        B, T, _ = x.shape
        h, kvh, hd = self.heads, self.kv_heads, self.head_dim
        q, k, v = mx.split(self.qkv(self.norm(x)), [h * hd, (h + kvh) * hd], axis=-1)
        q = q.reshape(B, T, h, hd).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, kvh, hd).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, kvh, hd).transpose(0, 2, 1, 3)
        if "query_norm" in self:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = self.proj(o.transpose(0, 2, 1, 3).reshape(B, T, h * hd))
        return self.post_norm(o) if "post_norm" in self else o


class MaskedLayer(Layer):
    def __init__(self, cfg, channels, heads, kv_heads):
        super().__init__(cfg, channels, heads, kv_heads, causal=False)
        self.attention = MaskedAttention(cfg, channels, heads, kv_heads, False)

    def __call__(self, x, rope=None, mask=None):
        x = x + self.attention(x, rope, None, mask)
        return x + self.mlp(x)


class VideoDenoiser(Denoiser):
    """The learnable self-denoiser over a clip: non-causal within its frame window."""

    def __init__(self, cfg: FlowConfig):
        super().__init__(cfg)
        self.attn_blocks = [
            MaskedLayer(cfg, cfg.channels, cfg.num_heads, cfg.num_kv_heads) for _ in range(cfg.denoiser_layers)
        ]

    def __call__(self, x, rope=None, text=None, mask=None):
        h = self.proj_in(x.astype(self.proj_in.weight.dtype))
        n_txt = 0
        if text is not None:
            t = self.proj_txt(text.astype(self.proj_txt.weight.dtype))
            n_txt = t.shape[1]
            h = mx.concatenate([t, h], axis=1)
        for layer in self.attn_blocks:
            h = layer(h, rope, mask)
        h = h[:, n_txt:]
        if "final_norm" in self:
            h = self.final_norm(h)
        return self.proj_out(h).astype(mx.float32)


# -- the flow ----------------------------------------------------------------------------------


class VideoFlow(nn.Module):
    """A STARFlow-V model: parameter names and shapes those of the reference checkpoint."""

    def __init__(self, cfg: FlowConfig, video: VideoConfig):
        super().__init__()
        check_video_config(cfg, video)
        self.blocks = [FlowBlock(cfg, i) if n > 0 else IdentityBlock() for i, n in enumerate(cfg.layers_per_block)]
        if cfg.learnable_self_denoiser:
            self.learnable_self_denoiser = VideoDenoiser(cfg)
        self._config = cfg
        self._video = video

    @property
    def config(self) -> FlowConfig:
        return self._config

    @property
    def video(self) -> VideoConfig:
        return self._video

    # -- layout ----------------------------------------------------------------------------

    def patchify(self, x):
        """(B, T, H, W, C) -> tokens (B, T, h*w, p*p*C), each frame row-major over patches."""
        B, T, H, W, C = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"frames of {H}x{W} are not a multiple of the patch size {p}")
        x = x.reshape(B, T, H // p, p, W // p, p, C).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, T, (H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens, h: int, w: int):
        """Tokens (B, T, h*w, D) -> (B, T, h*p, w*p, C)."""
        B, T = tokens.shape[:2]
        p, C = self.config.patch_size, self.config.in_channels
        x = tokens.reshape(B, T, h, w, p, p, C).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(B, T, h * p, w * p, C)

    def grid(self, x):
        p = self.config.patch_size
        return x.shape[2] // p, x.shape[3] // p

    def rope(self, h: int, w: int, frames: int, txt_len: int = 0):
        cfg = self.config
        return video_rope(cfg.head_dim, h, w, frames, txt_len, cfg.pt_seq_len)

    def check_input(self, x, name: str):
        C = self.config.in_channels
        if x.ndim != 5 or x.shape[-1] != C:
            raise ValueError(f"{name} must be (batch, frames, height, width, {C}), got shape {tuple(x.shape)}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} has no frames")

    def check_text(self, y, batch: int):
        return check_text(self.config, y, batch)

    def order(self, tokens, frames: int, flip: bool):
        """Tokens (B, frames*F, D) in a block's order and back: a flipped block reverses
        each frame with `temporal_causal`, the whole sequence without."""
        return permute(tokens, frames if self.video.temporal_causal else 1, flip)

    def is_local(self, i: int) -> bool:
        """Whether block i sees one frame at a time."""
        return self.video.shallow_block_local and i < len(self.blocks) - 1

    # -- density -----------------------------------------------------------------------------

    def __call__(self, x, y=None):
        """Data -> noise. x (B, T, H, W, C); returns z (same shape, float32) and the
        total log-determinant per sample (B,)."""
        self.check_input(x, "x")
        text = self.check_text(y, x.shape[0])
        h, w = self.grid(x)
        tokens = self.patchify(x).astype(mx.float32)
        B, T, F, D = tokens.shape
        logdet = mx.zeros((B,), dtype=mx.float32)
        for i, block in enumerate(self.blocks):
            if isinstance(block, IdentityBlock):
                continue
            t = text if block.has_text else None
            if self.is_local(i):
                seq, frames = tokens.reshape(B * T, F, D), 1
            else:
                seq, frames = tokens.reshape(B, T * F, D), T
            rope = self.rope(h, w, frames, 0 if t is None else t.shape[1])
            seq = self.order(seq, frames, block.flip)
            a, b = block.affine(seq, rope, t)
            z = (seq - b) / block.scale(a)
            ld = -block.log_scale(a).reshape(B, -1).sum(axis=1)
            tokens = self.order(z, frames, block.flip).reshape(B, T, F, D)
            logdet = logdet + ld
        return self.unpatchify(tokens, h, w), logdet

    forward = __call__

    def log_prob(self, x, y=None):
        """Exact log p(x | y) per sample, in nats, of the latent clip."""
        z, logdet = self(x, y)
        return log_normal(z) + logdet

    # -- denoising -----------------------------------------------------------------------------

    def learned_denoise(self, x, y=None):
        """The learnable self-denoiser over the whole clip: x - 0.3 * denoiser(x, y)."""
        if "learnable_self_denoiser" not in self:
            raise ValueError("this model has no learnable self-denoiser")
        self.check_input(x, "x")
        den = self.learnable_self_denoiser
        text = self.check_text(y, x.shape[0]) if den.has_text else None
        h, w = self.grid(x)
        tokens = self.patchify(x)
        B, T, F, D = tokens.shape
        L = 0 if text is None else text.shape[1]
        rope = self.rope(h, w, T, L)
        shift = self.video.temporal_causal
        mask = denoiser_mask(L, F, T, shift, self.video.denoiser_window) if shift > 0 else None
        out = den(tokens.reshape(B, T * F, D), rope, text, mask)
        return x - 0.3 * self.unpatchify(out.reshape(B, T, F, D), h, w)
