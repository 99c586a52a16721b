"""The memory of a STARFlow-V clip as the video command makes it, computed from the shapes (nothing is
allocated or loaded): per precision, frame count and local attention window.

    python -m mlx_starflow.tools.video_memory            # the released 7B at 480p: peaks and what fits

What the command holds (video.VideoPipeline): the flow and the Wan2.2 VAE (encoder and decoder, as
load_wan_vae loads them) stay resident; the text encoder is loaded beside them, encodes the prompt and its
negative, and is freed; then each stage in turn:

- text: T5 weights and activations (precision_policy's 40 x rows x tokens x width x 4 bytes);
- deep block: its KV cache, every layer's keys and values for the text and the latent frames it attends
  to (all of them, or `local_attn_window` with a window: the cache is allocated for the window and emptied
  when full), for the guided rows (2), in the activations' dtype (float32 for a float32 flow, else bf16:
  a quantized flow's cache is in its bf16 activations); plus the step's activations (the 3-D RoPE tables
  of the whole clip, the sampler's token buffers, small);
- shallow blocks: one block at a time, every latent frame a row of its own (frame-local), a cache of one
  frame's positions per row;
- the learned self-denoiser over the clip (or chunks of the window): its boolean frame mask (S x S for S
  positions; numpy builds it with about three S x S temporaries first) and one layer's activations,
  DENOISE_ACT x S x width x the activations' bytes; on a CPU also the attention scores (MLX's CPU attention
  with a mask materialises heads x S x S of them; Metal's fused kernel does not);
- the VAE decode, one latent frame at a time (four video frames): DECODE_BYTES_PER_PIXEL of one output
  frame's pixels above the weights (measured, tools/video_benchmark.py), whatever the clip's length;
- and the finished frames, uint8, kept by the pipeline for its result (frames x H x W x 3).

The whole command's peak is the resident weights plus the largest stage's own memory. What fits a Mac: the
peak plus a margin (10% of the memory, at least 1 GB, as precision_policy) within the GPU's recommended
working set (2/3 of the memory up to 16 GB, 3/4 above: what_fits.gpu_memory).
"""

import argparse
import math
from dataclasses import dataclass
from typing import Optional

from mlx.utils import tree_flatten

from ..loading.precision_policy import (
    GB,
    MARGIN,
    MIN_MARGIN,
    VIDEO_DECODE_BYTES_PER_PIXEL,
    VIDEO_DENOISE_ACT,
    Sizes,
    sizes_of,
)
from ..loading.video import RELEASED_VIDEO, video_config_from_args
from ..models.t5 import T5Config, T5Encoder
from ..models.video import VideoFlow
from ..models.wan_vae import WanVAE, WanVAEConfig
from ..video import MAX_FRAMES, aspect_size
from .random_models import ARCHS
from .what_fits import gpu_memory

# One layer of the self-denoiser at once: its input, normed input, qkv (3), the rotated q and k (float32),
# the attention's output, projection and residual, the MLP's hidden and activated (4 + 4) and output:
# about 20 widths per position at peak, in the activations' bytes (float32 for the rotated parts).
DENOISE_ACT = VIDEO_DENOISE_ACT
# The Wan2.2 VAE's decode of one latent frame (four 480x848 frames out) above its weights, per pixel of
# one output frame: float32, measured on a CPU at the released widths (BENCHMARKS.md), the frame caches
# included: 14.3 KB a pixel at 128x224 and 256x448 (5.8 GB at 480x848) with the decoder evaluated block by
# block and its convolutions in strips (device.prepare on a CPU); block by block without strips 114 KB, as
# one graph 187 KB. Not measured on Metal. The video precision policy takes the same figure.
DECODE_BYTES_PER_PIXEL = VIDEO_DECODE_BYTES_PER_PIXEL
MACS = (16, 32, 64)
PRECISIONS = ("float32", "bfloat16", "8-bit", "4-bit")
# The same with the deep block's KV cache at 8 bits (--kv-bits 8).
KV8 = " + kv 8-bit"
PRECISIONS_KV8 = tuple(p + KV8 for p in PRECISIONS)
RELEASED = "starflow-v_7B_t2v_caus_480p"


def precision(name: str):
    """'float32' | 'bfloat16' | '8-bit' | '4-bit' (each maybe + KV8) -> (weights dtype, bits)."""
    name = name.removesuffix(KV8)
    if name.endswith("-bit"):
        return "bfloat16", int(name[:-4])
    return name, None


def cache_value_bytes(prec: str) -> float:
    """Bytes a cached key or value element: the activations' dtype (float32 for a float32 flow,
    else bf16), or with KV8 one byte plus a scale and an offset in that dtype per group of 64
    (cache.QuantizedKVCache)."""
    act = 4 if precision(prec)[0] == "float32" else 2
    return 1 + 2 * act / 64 if prec.endswith(KV8) else act


@dataclass
class VideoShapes:
    """What the estimate needs of a video model at one frame size."""

    flow: Sizes
    text: Sizes
    vae: Sizes
    deep_layers: int
    deep_kv_heads: int
    deep_heads: int
    head_dim: int
    shallow_layers: tuple  # layers of each shallow block with layers
    shallow_kv_heads: int
    denoiser_layers: int
    denoiser_width: int
    denoiser_heads: int
    txt_size: int
    txt_dim: int
    tokens_per_frame: int  # latent tokens of one frame
    height: int  # pixels of a video frame
    width: int
    token_dim: int  # channels of a latent token
    trained_frames: int  # latent frames of the training clips (0: unknown)
    temporal_factor: int = 4  # video frames per latent frame after the first

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_factor


def flow_sizes(flow: VideoFlow) -> Sizes:
    return sizes_of({k: ("F32", v.shape) for k, v in tree_flatten(flow.parameters())})


def video_shapes(
    args: Optional[dict] = None,
    txt_dim: int = 2048,
    t5: Optional[dict] = None,
    vae: Optional[dict] = None,
    aspect: Optional[str] = "16:9",
    vae_downsample: Optional[int] = None,
) -> VideoShapes:
    """The shapes of a video model (default the released 7B with T5-XL and the Wan2.2 VAE at 480x848);
    the modules are built lazily and never evaluated."""
    args = RELEASED_VIDEO[RELEASED] if args is None else args
    cfg, video = video_config_from_args(args, txt_dim=txt_dim, vae_downsample=vae_downsample)
    flow = VideoFlow(cfg, video)
    text = T5Encoder(T5Config(**(t5 or ARCHS["3b"]["t5"])))
    wan = WanVAE(WanVAEConfig.from_dict(vae or {}))
    side = cfg.image_size or cfg.input_size * cfg.pixels_per_latent
    multiple = cfg.pixels_per_latent * cfg.patch_size
    h, w = aspect_size(side, aspect, multiple) if cfg.mix_aspect else (side, side)
    deep = flow.blocks[-1]
    shallow = tuple(len(b.attn_blocks) for b in flow.blocks[:-1] if "attn_blocks" in b and b.attn_blocks)
    den = flow.learnable_self_denoiser if "learnable_self_denoiser" in flow else None
    return VideoShapes(
        flow=flow_sizes(flow),
        text=sizes_of({k: ("F32", v.shape) for k, v in tree_flatten(text.parameters())}),
        vae=sizes_of({k: ("F32", v.shape) for k, v in tree_flatten(wan.parameters())}),
        deep_layers=len(deep.attn_blocks),
        deep_kv_heads=deep.kv_heads,
        deep_heads=deep.attn_blocks[0].attention.heads,
        head_dim=deep.head_dim,
        shallow_layers=shallow,
        shallow_kv_heads=cfg.num_kv_heads,
        denoiser_layers=0 if den is None else len(den.attn_blocks),
        denoiser_width=cfg.channels,
        denoiser_heads=cfg.num_heads,
        txt_size=cfg.txt_size or 0,
        txt_dim=cfg.txt_dim or 0,
        tokens_per_frame=(h // multiple) * (w // multiple),
        height=h,
        width=w,
        token_dim=cfg.token_dim,
        trained_frames=1 + (video.frames - 1) // wan.config.temporal_factor if video.frames else 0,
        temporal_factor=wan.config.temporal_factor,
    )


def kv_bytes(layers: int, rows: int, kv_heads: int, positions: int, head_dim: int, act_bytes: int) -> int:
    """Keys and values of `layers` preallocated caches (cache.KVCache) of `positions` positions."""
    return 2 * layers * rows * kv_heads * positions * head_dim * act_bytes


def deep_positions(s: VideoShapes, latent: int, window: Optional[int]) -> int:
    """Positions of the deep block's cache: the text and the frames it attends to."""
    return s.txt_size + (latent if window is None else min(window, latent)) * s.tokens_per_frame


def deep_cache_bytes(s: VideoShapes, latent: int, window: Optional[int], rows: int, act_bytes: int) -> int:
    """The deep block's KV cache as video_sample allocates it (rows: 2 for one guided clip)."""
    positions = deep_positions(s, latent, window)
    return kv_bytes(s.deep_layers, rows, s.deep_kv_heads, positions, s.head_dim, act_bytes)


def shallow_cache_bytes(s: VideoShapes, latent: int, act_bytes: int, batch: int = 1) -> int:
    """The largest shallow block's cache: every latent frame a row, one frame's positions."""
    layers = max(s.shallow_layers, default=0)
    return kv_bytes(layers, batch * latent, s.shallow_kv_heads, s.tokens_per_frame, s.head_dim, act_bytes)


def window_of(s: VideoShapes, latent: int, window: Optional[int]) -> Optional[int]:
    """The window the command samples with: the one given, or the training length past it (the
    reference's target_length), None when it covers the clip."""
    if window is None and s.trained_frames and latent > s.trained_frames:
        window = s.trained_frames
    return window


def stage_bytes(
    s: VideoShapes,
    prec: str,
    frames: int,
    window: Optional[int] = None,
    gpu: bool = True,
    text_dtype: Optional[str] = None,
    rows: int = 2,
    decode: float = DECODE_BYTES_PER_PIXEL,
) -> dict:
    """{stage: (weights of that stage beside the resident ones, activations)} in bytes, plus
    "resident": the flow's and the VAE's weights. text_dtype None: float32 with a float32 flow, else
    bfloat16 (the video command's --text-dtype)."""
    dtype, bits = precision(prec)
    act = 4 if dtype == "float32" else 2
    latent = s.latent_frames(frames)
    window = window_of(s, latent, window)
    seen = latent if window is None else min(window, latent)
    clip_positions = s.txt_size + latent * s.tokens_per_frame
    tokens = rows * latent * s.tokens_per_frame * s.token_dim * 4
    # the RoPE tables (cos, sin) of the whole clip, the noise, the Jacobi buffer and the result
    step = 2 * clip_positions * s.head_dim // 2 * 4 + 4 * tokens
    td = text_dtype or ("float32" if dtype == "float32" else "bfloat16")
    out = {
        "resident": (s.flow.bytes(dtype, bits) + s.vae.bytes("float32"), 0),
        "text": (s.text.bytes(td), 40 * rows * s.txt_size * max(s.txt_dim, 1) * 4),
        "deep": (0, deep_cache_bytes(s, latent, window, rows, cache_value_bytes(prec)) + step),
        "shallow": (0, shallow_cache_bytes(s, latent, act) + step),
    }
    if s.denoiser_layers:
        S = s.txt_size + seen * s.tokens_per_frame
        layer = DENOISE_ACT * S * s.denoiser_width * act
        scores = 0 if gpu else s.denoiser_heads * S * S * act
        out["denoise"] = (0, max(4 * S * S, S * S + layer + scores) + tokens)
    pixels = s.height * s.width
    out["decode"] = (0, decode * pixels + frames * pixels * 3 + tokens)
    return out


def whole_peak(stages: dict) -> float:
    """The command's peak: the resident weights plus the largest stage's own memory."""
    resident = stages["resident"][0]
    return resident + max(w + a for k, (w, a) in stages.items() if k != "resident")


def peak(s: VideoShapes, prec: str, frames: int, window: Optional[int] = None, gpu: bool = True, decode=None) -> float:
    d = DECODE_BYTES_PER_PIXEL if decode is None else decode
    return whole_peak(stage_bytes(s, prec, frames, window, gpu, decode=d))


def fits(peak_bytes: float, available: float) -> bool:
    return peak_bytes + max(MIN_MARGIN, MARGIN * available) <= available


def largest_window(s: VideoShapes, prec: str, frames: int, available: float, gpu: bool = True, decode=None) -> int:
    """The largest local window (latent frames, up to the clip's) whose whole-command peak fits, or 0 when
    not even one frame does."""
    latent = s.latent_frames(frames)
    best = 0
    for w in range(1, latent + 1):
        if fits(peak(s, prec, frames, w, gpu, decode), available):
            best = w
    return best


def fit_rows(s: VideoShapes, macs=MACS, frames: int = 81, decode=None, precisions=PRECISIONS) -> list:
    """Per Mac and precision: the peak at `frames` with the full window, the largest window that fits,
    and the largest clip at that window (up to the command's MAX_FRAMES)."""
    rows = []
    latent = s.latent_frames(frames)
    for gb in macs:
        avail = gpu_memory(gb)
        for prec in precisions:
            full = peak(s, prec, frames, None, decode=decode)
            w = largest_window(s, prec, frames, avail, decode=decode)
            longest = 0
            if w:
                top = 1 + (MAX_FRAMES - 1) // s.temporal_factor * s.temporal_factor
                for f in range(top, 0, -s.temporal_factor):
                    if fits(peak(s, prec, f, w, decode=decode), avail):
                        longest = f
                        break
            rows.append(
                {
                    "mac_gb": gb,
                    "available": avail,
                    "precision": prec,
                    "peak_full": full,
                    "full_fits": fits(full, avail),
                    "window": w,
                    "window_frames": 1 + (w - 1) * s.temporal_factor if w else 0,
                    "peak_window": peak(s, prec, frames, w, decode=decode) if w else math.nan,
                    "longest": longest,
                    "latent": latent,
                }
            )
    return rows


def peak_table(
    s: VideoShapes, frames=(1, 17, 41, 81), windows=(None, 1, 5, 10), decode=None, precisions=PRECISIONS
) -> list:
    """Markdown: the whole-command peak (GB) per precision, frame count and window."""
    head = "| precision | window (latent frames) | " + " | ".join(f"{f} frames" for f in frames) + " |"
    lines = [head, "|---|---|" + "---|" * len(frames)]
    for prec in precisions:
        for w in windows:
            cells = []
            for f in frames:
                lat = s.latent_frames(f)
                cells.append("-" if w is not None and w >= lat else f"{peak(s, prec, f, w, decode=decode) / GB:.1f}")
            lines.append(f"| {prec} | {'all' if w is None else w} | " + " | ".join(cells) + " |")
    return lines


def fit_table(s: VideoShapes, frames: int = 81, decode=None, precisions=PRECISIONS) -> list:
    lines = [
        f"| Mac | working set | precision | {frames} frames, whole clip in the cache | largest window that fits "
        "(latent frames = video frames) | peak at that window | longest clip at that window |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in fit_rows(s, frames=frames, decode=decode, precisions=precisions):
        full = f"{r['peak_full'] / GB:.1f} GB" + ("" if r["full_fits"] else " (does not fit)")
        if r["window"]:
            win = f"{r['window']} = {r['window_frames']}"
            pk = f"{r['peak_window'] / GB:.1f} GB"
            longest = f"{r['longest']} frames"
        else:
            win, pk, longest = "none", "-", "-"
        lines.append(
            f"| {r['mac_gb']} GB | {r['available'] / GB:.1f} GB | {r['precision']} | {full} | {win} | {pk} | "
            f"{longest} |"
        )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=81, help="video frames of the clip (1 + 4k)")
    p.add_argument(
        "--decode-bytes",
        type=float,
        default=DECODE_BYTES_PER_PIXEL,
        help="the VAE decode's bytes a pixel above its weights (default: as measured on a CPU; 0 leaves it out)",
    )
    a = p.parse_args(argv)
    s = video_shapes()
    print(
        f"STARFlow-V 7B at {s.height}x{s.width}: {s.tokens_per_frame} tokens a latent frame, "
        f"{s.txt_size} text tokens; flow {s.flow.linear + s.flow.plain:,} parameters"
    )
    print(f"the VAE decode of one latent frame: {a.decode_bytes * s.height * s.width / GB:.1f} GB above its weights")
    print("\n".join(peak_table(s, decode=a.decode_bytes)))
    print()
    print("\n".join(fit_table(s, a.frames, a.decode_bytes)))
    print("\nwith the deep block's KV cache at 8 bits (--kv-bits 8):")
    print("\n".join(peak_table(s, windows=(None, 10), decode=a.decode_bytes, precisions=PRECISIONS_KV8)))
    print()
    print("\n".join(fit_table(s, a.frames, a.decode_bytes, PRECISIONS_KV8)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
