"""The SD-VAE (diffusers `AutoencoderKL`) in MLX: decoder, encoder, image helpers.

Everything is channels-last (NHWC). `VAE.decode` / `VAE.encode` work on raw
latents; `decode_latents` / `encode_image` apply the scaling factor the flow
model was trained with.
"""

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: List[int] = field(default_factory=lambda: [64])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    act_fn: str = "silu"
    down_block_types: Optional[List[str]] = None
    up_block_types: Optional[List[str]] = None

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in d.items() if k in names})
        config.validate()
        return config

    def validate(self):
        if self.act_fn != "silu":
            raise ValueError(f"unsupported VAE act_fn {self.act_fn!r}: only 'silu' is implemented")
        n = len(self.block_out_channels)
        for name, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if types is None:
                continue
            if len(types) != n or any(t != want for t in types):
                raise ValueError(
                    f"unsupported VAE {name} {types}: expected {n} x {want!r} "
                    "(only the plain AutoencoderKL blocks are implemented)"
                )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        # As the reference: 2 ** (len(down_block_types) - 1), one block per level.
        return 2 ** (len(self.block_out_channels) - 1)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that can convolve a large input in strips of rows, evaluating each.

    MLX's CPU convolution unfolds its input (k*k times its size) before the matrix
    product, and allocates an operation's buffers when it is scheduled rather than
    when it runs; decoding 256x256 images in one graph therefore held 2.25 GB of
    activations, mostly unfolded inputs. Strips with their k // 2 rows of context
    give the same output while only one strip's buffer exists at a time. Off unless
    `strip_elements` is set (device.prepare sets it on a CPU)."""

    strip_elements = None  # the largest unfolded input convolved at once, in elements

    def __call__(self, x):
        B, H, W, C = x.shape
        k = self.weight.shape[1]
        p = self.padding[0]
        if self.strip_elements is None:
            return super().__call__(x)
        rows = max(1, self.strip_elements // (B * W * C * k * k))
        same_size = self.stride == (1, 1) and self.dilation in (1, (1, 1)) and 2 * p == k - 1
        if k == 1 or rows >= H or not same_size:
            return super().__call__(x)
        strips = []
        for top in range(0, H, rows):
            bottom = min(top + rows, H)
            lo, hi = max(top - p, 0), min(bottom + p, H)
            strip = mx.pad(x[:, lo:hi], [(0, 0), (p - (top - lo), p - (hi - bottom)), (0, 0), (0, 0)])
            strips.append(mx.conv2d(strip, self.weight, padding=(0, self.padding[1]), groups=self.groups))
            mx.eval(strips[-1])
        y = mx.concatenate(strips, axis=1)
        return y + self.bias if "bias" in self else y


class GroupNorm(nn.Module):
    """PyTorch-layout group norm (channel c is in group c // (C / G)); statistics
    in float32 so bfloat16 decoding stays stable."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        B, H, W, C = x.shape
        dtype = x.dtype
        h = x.astype(mx.float32).reshape(B, H * W, self.num_groups, C // self.num_groups)
        mean = h.mean(axis=(1, 3), keepdims=True)
        var = h.var(axis=(1, 3), keepdims=True)
        h = ((h - mean) * mx.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (h * self.weight.astype(mx.float32) + self.bias.astype(mx.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x):
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """The mid-block self-attention: one head as wide as the channels."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, dims)
        self.to_q = nn.Linear(dims, dims)
        self.to_k = nn.Linear(dims, dims)
        self.to_v = nn.Linear(dims, dims)
        self.to_out = [nn.Linear(dims, dims)]

    def __call__(self, x):
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))
        return x + self.to_out[0](h).reshape(B, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, dims: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(dims, dims, groups), ResnetBlock(dims, dims, groups)]
        if attention:
            self.attentions = [Attention(dims, groups)]

    def __call__(self, x):
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, stride=2)

    def __call__(self, x):
        # diffusers pads only bottom and right before the stride-2 conv.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, padding=1)

    def __call__(self, x):
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return self.conv(x.reshape(B, 2 * H, 2 * W, C))


class ResnetStage(nn.Module):
    """Resnet blocks, then an optional resampler, under diffusers' key names
    (`downsamplers.0` in the encoder, `upsamplers.0` in the decoder)."""

    def __init__(self, in_channels, out_channels, layers, groups, resampler=None):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        ]
        self.resample_key = None
        if resampler is not None:
            self.resample_key = "downsamplers" if resampler is Downsample else "upsamplers"
            setattr(self, self.resample_key, [resampler(out_channels)])

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample_key is not None:
            x = self[self.resample_key][0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            ResnetStage(ch[max(i - 1, 0)], ch[i], config.layers_per_block, g, Downsample if i < len(ch) - 1 else None)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        # Mean and log-variance, hence twice the latent channels.
        self.conv_out = Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, g = list(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, config.mid_block_add_attention)
        # The decoder has one more resnet per level than the encoder.
        self.up_blocks = [
            ResnetStage(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, g, Upsample if i < len(ch) - 1 else None)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


def _ramp(n: int, start: int, stop: int, size: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a tile covering [start, stop) of `size`:
    linear ramps over `overlap` at edges that meet another tile, 1 elsewhere."""
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if start > 0:
            w[:overlap] = np.minimum(w[:overlap], ramp)
        if stop < size:
            w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def _tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    # Spread the tiles evenly so every overlap is at least `overlap`.
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(c, c, 1)

    @property
    def dtype(self):
        return self.decoder.conv_in.weight.dtype

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_latents(self, z):
        c = self.config.latent_channels
        if z.ndim != 4:
            raise ValueError(f"VAE.decode expects NHWC latents (batch, height, width, {c}); got shape {tuple(z.shape)}")
        if z.shape[-1] != c:
            hint = " (NCHW? transpose to NHWC)" if z.shape[1] == c else ""
            raise ValueError(
                f"VAE.decode expects {c} latent channels in the last axis; got shape {tuple(z.shape)}{hint}"
            )

    def _decode(self, z):
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z, tile: Optional[int] = None, overlap: Optional[int] = None):
        """Latents (B, h, w, C) without scaling -> images (B, H, W, out_channels) in about [-1, 1].

        With `tile`, decode tiles of `tile` x `tile` latents overlapping by `overlap`
        (default tile // 4) and blend them linearly: lower peak memory, close to but
        not bit-equal to a full decode (group norm and attention see one tile only).
        """
        steps = self.decode_steps(z, tile, overlap)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def decode_steps(self, z, tile: Optional[int] = None, overlap: Optional[int] = None):
        """`decode` as a generator: yields (tiles done, tiles) after each tile (one step
        untiled), so a caller can stop between tiles; returns the images."""
        z = mx.array(z) if not isinstance(z, mx.array) else z
        self._check_latents(z)
        if tile is None:
            return self._decode(z)
        overlap = tile // 4 if overlap is None else overlap
        if tile < 1 or overlap < 0 or 2 * overlap > tile:
            raise ValueError(f"tiled decode needs tile >= 1 and 0 <= overlap <= tile / 2; got {tile=}, {overlap=}")
        B, h, w, _ = z.shape
        f = self.downsample_factor
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self._decode(z)
        out = mx.zeros((B, h * f, w * f, self.config.out_channels), dtype=mx.float32)
        total = mx.zeros((1, h * f, w * f, 1), dtype=mx.float32)
        for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
            th, tw = min(tile, h - y), min(tile, w - x)
            img = self._decode(z[:, y : y + th, x : x + tw]).astype(mx.float32)
            wy = _ramp(th * f, y, y + th, h, overlap * f)
            wx = _ramp(tw * f, x, x + tw, w, overlap * f)
            weight = mx.array(wy[:, None] * wx[None, :])[None, :, :, None]
            out[:, y * f : (y + th) * f, x * f : (x + tw) * f] += img * weight
            total[:, y * f : (y + th) * f, x * f : (x + tw) * f] += weight
            # Evaluate each tile now so only one tile's activations are alive.
            mx.eval(out, total)
            yield k + 1, len(ys) * len(xs)
        return (out / total).astype(self.dtype)

    def encode(self, x):
        """Images (B, H, W, in_channels) in [-1, 1] -> latent mean (B, H/f, W/f, C), without scaling."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded without its encoder (load_vae(..., encoder=True))")
        x = mx.array(x) if not isinstance(x, mx.array) else x
        c, f = self.config.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != c:
            hint = " (NCHW? transpose to NHWC)" if x.ndim == 4 and x.shape[1] == c else ""
            raise ValueError(
                f"VAE.encode expects NHWC images (batch, height, width, {c}); got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"VAE.encode needs image height and width that are multiples of {f}; got "
                f"{x.shape[1]}x{x.shape[2]} (resize or crop, e.g. with from_pil)"
            )
        h = self.encoder(x.astype(self.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels]


def unscale(vae: VAE, latents):
    """Scaled latents as the flow samples them -> the VAE's own latents."""
    c = vae.config
    z = latents / c.scaling_factor
    return z + c.shift_factor if c.shift_factor is not None else z


def decode_latents(vae: VAE, latents, **kwargs):
    """Scaled latents as the flow samples them -> images in about [-1, 1]."""
    return vae.decode(unscale(vae, latents), **kwargs)


def encode_image(vae: VAE, x):
    """Images in [-1, 1] -> the scaled latent mean the flow model expects."""
    c = vae.config
    z = vae.encode(x)
    if c.shift_factor is not None:
        z = z - c.shift_factor
    return z * c.scaling_factor


_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename(key: str) -> str:
    parts = key.split(".")
    # Older diffusers checkpoints (e.g. stabilityai/sd-vae-ft-ema) use the
    # AttentionBlock names inside mid_block.attentions.N.
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
        parts[-2] = _OLD_ATTENTION_NAMES[parts[-2]]
    return ".".join(parts)


def sanitize(weights: dict) -> dict:
    """diffusers state dict -> MLX names and layouts."""
    out = {}
    for key, value in weights.items():
        key = _rename(key)
        if not isinstance(value, mx.array):
            value = mx.array(value)
        if value.ndim == 4:
            if ".attentions." in key:
                # Attention projections once stored as 1x1 convolutions.
                value = value.reshape(value.shape[0], value.shape[1])
            else:
                # PyTorch conv (O, I, kh, kw) -> MLX channels-last (O, kh, kw, I).
                value = value.transpose(0, 2, 3, 1)
        out[key] = value
    return out
