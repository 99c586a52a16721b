"""`python -m mlx_starflow.benchmark --video`: one latent frame of STARFlow-V measured (time and peak
memory) on random weights, and a 480p clip estimated per precision from the released shapes.

A frame, as video_sample makes it (sequential loop; Jacobi's iterations depend on trained weights):

- deep: the frame's tokens through the deep block, guided (2 rows), its KV cache allocated for the clip
  (or the local window) and holding the text and the frames before it: `tokens` tokens timed at the
  frame's start and at its end (a token's cost is affine in its position), times the frame's tokens; the
  measured frame (default the last) and the clip's first, in the same cache;
- shallow: the largest shallow block's step, times a frame's tokens, for every shallow block: a frame
  alone (streamed, as sequential sampling runs frame-local blocks) and every latent frame a row
  (batched, as Jacobi's pass over the clip; a frame's share is that over the clip's latent frames);
- denoise: the learned self-denoiser over one latent frame and the text (its frame mask included);
- decode: the Wan2.2 VAE's later steps (one latent frame -> four video frames), at the clip's size
  divided by `vae_scale` in each dimension, scaled up by the pixels (its convolutions are linear in them).

Each stage builds its own part of the flow alone (random_video_flow's `only`), prepared for the device as
the video pipeline loads it (device.prepare), and frees it after. `layers` (7B: the machine cannot hold
it) builds every part with at most that many layers; each stage is timed with its first layer alone and
with all it has, and extrapolated linearly in the layer count: t(L) = t(1) + (L - 1) x (t(n) - t(1)) /
(n - 1), the slope being one layer's cost (the rest, embedding and head, is the intercept); with one layer,
t(L) = L x t(1). Peaks are extrapolated as the measured activations (peak less the weights and caches,
measured) plus the full model's weights and caches computed from its shapes. Times are medians of
`repeats` runs.

The clip estimate (per precision): the flow's stages scaled from the frame (deep: every frame on the line
through the first and the measured frame, its prefix the position; denoise: by its multiply-adds, linear
in the positions for the linears and quadratic for the attention, at the rate measured on one frame), the
text encoder's time (measure_text, cut to `layers` as the flow) and the load's (measure_load: the bytes of
the flow, the text encoder and the VAE at the read speed measured on one deep layer's folder) when
measured, and the whole command's peak (tools/video_memory.py).
"""

import gc
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..loading import device
from ..loading.video import RELEASED_VIDEO, video_config_from_args
from ..loading.weights import quantize_model
from ..models.t5 import T5Config, T5Encoder
from ..models.video import VideoFlow
from ..models.wan_vae import WanVAE, WanVAEConfig
from .benchmark import peak_rss, time_block_ends
from .random_models import ARCHS, randomize
from .video_memory import (
    DECODE_BYTES_PER_PIXEL,
    PRECISIONS,
    RELEASED,
    VideoShapes,
    deep_cache_bytes,
    deep_positions,
    precision,
    stage_bytes,
    video_shapes,
    whole_peak,
    window_of,
)

GB = 1e9
TINY_VAE = {
    "dim": 4,
    "dec_dim": 4,
    "z_dim": 4,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [True, True],
}
VIDEO_ARCHS = {
    "7b": {"flow": RELEASED_VIDEO[RELEASED], "txt_dim": 2048, "t5": ARCHS["3b"]["t5"], "vae": {}},
    "small": {
        "flow": {
            **RELEASED_VIDEO[RELEASED],
            "img_size": 256,
            "txt_size": 16,
            "channels": 256,
            "top_block_channels": 384,
            "layers_per_block": "1 1 1 1 1 4",
            "vid_size": "17:16",
        },
        "txt_dim": 256,
        "t5": ARCHS["small"]["t5"],
        "vae": {"dim": 16, "dec_dim": 16},
    },
    "tiny": {
        "flow": {
            **RELEASED_VIDEO[RELEASED],
            "img_size": 32,
            "txt_size": 4,
            "channel_size": 4,
            "channels": 64,
            "top_block_channels": 96,
            "head_dim": 32,
            "blocks": 3,
            "layers_per_block": "1 1 2",
            "denoiser_window": 2,
            "vid_size": "9:16",
        },
        "txt_dim": 16,
        "t5": ARCHS["tiny"]["t5"],
        "vae": {**TINY_VAE, "mean": [0.0] * 4, "std": [1.0] * 4},
    },
}


def _vae_config(arch):
    d = dict(VIDEO_ARCHS[arch]["vae"])
    z = d.get("z_dim", 48)
    if z != 48:
        d.setdefault("mean", [0.0] * z)
        d.setdefault("std", [1.0] * z)
    return WanVAEConfig.from_dict(d)


def arch_config(arch: str, layers: Optional[int] = None):
    """(FlowConfig, VideoConfig) of an architecture, every block and the self-denoiser cut to at most
    `layers` layers."""
    a = dict(VIDEO_ARCHS[arch]["flow"])
    if layers:
        a["layers_per_block"] = " ".join(str(min(int(n), layers)) for n in a["layers_per_block"].split())
    vae = _vae_config(arch)
    cfg, video = video_config_from_args(a, txt_dim=VIDEO_ARCHS[arch]["txt_dim"], vae_downsample=vae.spatial_factor)
    if layers:
        cfg = replace(cfg, denoiser_layers=min(cfg.denoiser_layers, layers))
    return cfg, video


def arch_shapes(arch: str) -> VideoShapes:
    a = VIDEO_ARCHS[arch]
    vae = _vae_config(arch)
    return video_shapes(a["flow"], a["txt_dim"], a["t5"], vae.to_dict(), vae_downsample=vae.spatial_factor)


STAGE_PARTS = ("deep", "shallow", "denoise")


def random_video_flow(
    arch: str, prec: str = "float32", layers: Optional[int] = None, seed: int = 0, only: Optional[str] = None
) -> VideoFlow:
    """Random weights of the architecture in the precision (quantized layer by layer), prepared for the
    device as the video pipeline loads a flow (device.prepare: on a CPU, float32 weights input-major and
    quantized products in float32). `only` ("deep", "shallow", "denoise"): that part alone is built (the
    largest shallow block for "shallow"), the other blocks identities and no self-denoiser but for
    "denoise", so a stage's memory is its own part's."""
    cfg, video = arch_config(arch, layers)
    if only is not None:
        if only not in STAGE_PARTS:
            raise ValueError(f"only must be one of {', '.join(STAGE_PARTS)}, not {only!r}")
        n = list(cfg.layers_per_block)
        keep = {len(n) - 1} if only == "deep" else set()
        if only == "shallow" and max(n[:-1], default=0):
            keep = {max(range(len(n) - 1), key=lambda i: n[i])}
        cfg = replace(
            cfg,
            layers_per_block=[k if i in keep else 0 for i, k in enumerate(n)],
            learnable_self_denoiser=cfg.learnable_self_denoiser and only == "denoise",
        )
    dtype, bits = precision(prec)
    flow = randomize(VideoFlow(cfg, video), getattr(mx, dtype), seed)
    if bits:
        quantize_model(flow, bits=bits)
    for b in flow.blocks:
        for layer in getattr(b, "attn_blocks", []):
            mx.eval(layer.parameters())
    mx.eval(flow.parameters())
    device.prepare(flow)
    mx.eval(flow.parameters())
    return flow


def random_wan_vae(arch: str, seed: int = 0) -> WanVAE:
    vae = WanVAE(_vae_config(arch))
    vae.encoder = None  # generation decodes only
    randomize(vae, mx.float32, seed)
    mx.eval(vae.parameters())
    return device.prepare(vae)  # as the pipeline holds it: strips of rows on a CPU


def per_layer(t1: float, tn: float, n: int, full: int) -> float:
    """A stage's cost at `full` layers from its cost with 1 and with n layers (linear in the layers)."""
    if n <= 1 or full <= 1:
        return t1 if full <= 1 else t1 * full
    return t1 + (full - 1) * (tn - t1) / (n - 1)


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


@contextmanager
def _first_layers(block, k, attr="attn_blocks"):
    """The block (or the self-denoiser, or the text encoder's `blocks`) runs its first k layers within
    the context."""
    layers = getattr(block, attr)
    setattr(block, attr, layers[:k])
    try:
        yield
    finally:
        setattr(block, attr, layers)


class Peak:
    def __enter__(self):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        self.before = mx.get_active_memory()
        return self

    def __exit__(self, *exc):
        self.peak = mx.get_peak_memory()


def _timed_layers(block, n, fn, attr="attn_blocks"):
    """fn() timed with the block's first layer and with its n layers: (t1, tn)."""
    out = []
    for k in sorted({1, n}):
        with _first_layers(block, k, attr):
            out.append(fn())
    return out[0], out[-1]


def measure_frame(
    arch: str = "tiny",
    prec: str = "float32",
    layers: Optional[int] = None,
    frames: Optional[int] = None,
    frame: Optional[int] = None,
    window: Optional[int] = None,
    guidance: float = 3.5,
    tokens: int = 4,
    vae_scale: int = 1,
    stages=("deep", "shallow", "denoise", "decode"),
    seed: int = 0,
    log=print,
    repeats: int = 1,
) -> dict:
    """One latent frame of a clip of `frames` video frames (default the training length), frame index
    `frame` (default the last), on random weights: each stage's time (the median of `repeats` runs) and
    peak, measured and extrapolated to the architecture's layers. Each stage builds its own part of the
    flow alone and frees it after, so the memory held is one stage's. The deep block is also timed at
    the clip's first frame, in the same cache (a token's cost is affine in its position, so the two give
    every frame's). Returns a dict of plain numbers."""
    s = arch_shapes(arch)
    cfg, video = arch_config(arch)
    frames = frames or video.frames or 9
    latent = s.latent_frames(frames)
    window = window_of(s, latent, window)
    frame = latent - 1 if frame is None else frame
    if not 0 <= frame < latent:
        raise ValueError(f"frame {frame} is not a latent frame of a {frames}-frame clip ({latent} latent frames)")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    dtype, bits = precision(prec)
    rows = 2 if guidance > 0 else 1
    out = {
        "arch": arch,
        "precision": prec,
        "frames": frames,
        "latent_frames": latent,
        "frame": frame,
        "window": window,
        "tokens_per_frame": s.tokens_per_frame,
        "size": [s.height, s.width],
        "guidance": guidance,
        "layers_built": layers,
        "repeats": repeats,
        "stages": {},
    }
    act = 4 if dtype == "float32" else 2
    F, L, D = s.tokens_per_frame, s.txt_size, s.token_dim
    ph, pw = s.height // cfg.pixels_per_latent // cfg.patch_size, s.width // cfg.pixels_per_latent // cfg.patch_size
    key = mx.random.key(seed + 1)
    y = 0.5 * mx.random.normal((rows, max(L, 1), max(cfg.txt_dim, 1)), key=key) if cfg.txt_dim else None
    full = {"deep": s.deep_layers, "shallow": max(s.shallow_layers, default=0), "denoise": s.denoiser_layers}

    def build(part):
        t = time.perf_counter()
        flow = random_video_flow(arch, prec, layers, seed, only=part)
        log(
            f"built the {part} part of {arch} {prec} ({'all layers' if not layers else f'at most {layers} layers'}) "
            f"in {time.perf_counter() - t:.1f} s: {_nbytes(flow) / GB:.2f} GB of weights"
        )
        return flow

    def finish(name, info, t1, tn, n, caches_built, caches_full):
        info["seconds_1_layer"] = t1
        if n > 1:
            info[f"seconds_{n}_layers"] = tn
        info["layers_timed"] = n
        info["seconds"] = per_layer(t1, tn, n, full[name])
        info["activations"] = max(0, info["peak_memory"] - info.pop("before") - caches_built)
        info["caches_built"], info["caches_full"] = caches_built, caches_full
        out["stages"][name] = info

    def free():
        gc.collect()
        mx.clear_cache()

    if "deep" in stages:
        flow = build("deep")
        block = flow.blocks[-1]
        n = len(block.attn_blocks)
        positions = deep_positions(s, latent, window)
        rope = flow.rope(ph, pw, (positions - L) // F, L)
        z = mx.random.normal((rows, F, D), key=mx.random.key(seed + 2))

        def prefix_of(f):
            return L + (f if window is None else min(f, window - 1)) * F

        timed = {}
        with Peak() as pk:
            caches = block.new_caches(rows, positions)
            if y is not None:
                block.prefill(y.astype(mx.float32), rope, caches)
            for f in sorted({0, frame}):

                def run(f=f):  # video_sample's loop: block_points, compile_step=False
                    p = prefix_of(f)
                    r = time_block_ends(block, z, caches, p, tokens, repeats, rope, None, guidance, compile_step=False)
                    return r["per_token"] * F

                timed[f] = _timed_layers(block, n, run)
        built = sum(c.nbytes for c in caches)
        info = {"peak_memory": pk.peak, "positions": positions, "prefix": prefix_of(frame), "rows": rows}
        info["before"] = pk.before
        finish("deep", info, *timed[frame], n, built, deep_cache_bytes(s, latent, window, rows, act))
        info["prefix_first_frame"] = prefix_of(0)
        info["seconds_first_frame"] = per_layer(*timed[0], n, full["deep"])
        del caches, flow, block
        free()
        log(
            f"deep block: {info['seconds']:.2f} s a frame at {info['prefix']} positions, "
            f"{info['seconds_first_frame']:.2f} s at {info['prefix_first_frame']} ({full['deep']} layers; {n} built), "
            f"cache {positions} positions, peak {pk.peak / GB:.2f} GB"
        )

    if "shallow" in stages and full["shallow"]:
        # Two ways: streamed (a frame alone, one row, as sequential sampling runs frame-local shallow
        # blocks: video_sample.streams) and batched (every latent frame a row, as Jacobi's pass after the
        # deep block). Streamed reads the weights once a frame, batched once for all frames.
        flow = build("shallow")
        block = next(b for b in flow.blocks[:-1] if getattr(b, "attn_blocks", None))
        n = len(block.attn_blocks)
        rope = flow.rope(ph, pw, 1, 0)
        z = mx.random.normal((latent, F, D), key=mx.random.key(seed + 3))
        timed = {}
        with Peak() as pk:
            for batch in sorted({1, latent}):
                caches = block.new_caches(batch, F)

                def run(batch=batch, caches=caches):
                    r = time_block_ends(
                        block, z[:batch], caches, 0, tokens, repeats, rope, None, 0.0, compile_step=False
                    )
                    return r["per_token"] * F

                timed[batch] = _timed_layers(block, n, run)
                built = sum(c.nbytes for c in caches)
                del caches
        info = {"peak_memory": pk.peak, "rows": latent, "blocks": len(s.shallow_layers), "before": pk.before}
        finish("shallow", info, *timed[latent], n, built, built)
        blocks = len(s.shallow_layers)
        info["seconds_clip_batched"] = info["seconds"] * blocks
        info["seconds_batched"] = info["seconds_clip_batched"] / latent  # a frame's share of the batched steps
        info["seconds_streamed"] = per_layer(*timed[1], n, full["shallow"]) * blocks  # a frame alone
        info["streams"] = bool(video.shallow_block_local)
        info["seconds"] = info["seconds_streamed" if info["streams"] else "seconds_batched"]
        del flow, block
        free()
        log(
            f"shallow blocks: {info['seconds_streamed']:.2f} s a frame alone (streamed), "
            f"{info['seconds_clip_batched']:.2f} s for all {latent} latent frames at once "
            f"({info['seconds_batched']:.2f} s a frame), peak {pk.peak / GB:.2f} GB"
        )

    if "denoise" in stages and s.denoiser_layers:
        flow = build("denoise")
        den = flow.learnable_self_denoiser
        n = len(den.attn_blocks)
        x = mx.random.normal(
            (1, 1, ph * cfg.patch_size, pw * cfg.patch_size, cfg.in_channels), key=mx.random.key(seed + 4)
        )
        yc = None if y is None else y[:1]

        def run():
            mx.eval(flow.learned_denoise(x, yc))  # warm-up
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                mx.eval(flow.learned_denoise(x, yc))
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)

        with Peak() as pk:
            t1, tn = _timed_layers(den, n, run)
        S = L + F
        info = {"peak_memory": pk.peak, "positions": S, "macs": denoise_macs(s, 1), "before": pk.before}
        finish("denoise", info, t1, tn, n, 0, 0)
        info["macs_per_second"] = info["macs"] / info["seconds"]
        del flow, den
        free()
        log(f"self-denoiser over one latent frame: {info['seconds']:.2f} s, peak {pk.peak / GB:.2f} GB")

    if "decode" in stages:
        vae = random_wan_vae(arch, seed)
        h = max(1, s.height // 16 // vae_scale) if arch == "7b" else max(1, s.height // vae.config.spatial_factor)
        w = max(1, s.width // 16 // vae_scale) if arch == "7b" else max(1, s.width // vae.config.spatial_factor)
        z = mx.random.normal((1, 1 + repeats, h, w, vae.config.z_dim), key=mx.random.key(seed + 5))
        steps = vae.decode_steps(z, 1)
        next(steps)  # the first latent frame alone
        runs = []
        with Peak() as pk:
            for _ in range(repeats):  # each later latent frame -> four video frames
                t0 = time.perf_counter()
                frame4 = next(steps)
                runs.append(time.perf_counter() - t0)
        seconds = statistics.median(runs)
        f = vae.config.spatial_factor
        scale = s.height * s.width / (h * w * f * f)
        info = {
            "peak_memory": pk.peak,
            "weights": _nbytes(vae),
            "measured_size": [h * f, w * f],
            "video_frames": int(frame4.shape[1]),
            "seconds_measured": seconds,
            "seconds_runs": runs,
            "seconds": seconds * scale,
            "activations": max(0, pk.peak - pk.before) * scale,
            "bytes_per_pixel": max(0, pk.peak - pk.before) / (h * w * f * f),
            "pixel_scale": scale,
        }
        out["stages"]["decode"] = info
        log(
            f"VAE decode of one latent frame ({info['video_frames']} video frames) at {h * f}x{w * f}: "
            f"{seconds:.2f} s, {info['bytes_per_pixel']:.0f} bytes a pixel above its weights; "
            f"x{scale:.1f} pixels: {info['seconds']:.1f} s"
        )
        del vae, steps
        free()
    out["peak_rss"] = peak_rss()
    return out


def _drop_from_page_cache(path: Path):
    """Ask the kernel to forget a file's cached pages (Linux; elsewhere a no-op), so it is read from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def measure_load(arch: str = "tiny", prec: str = "float32", seed: int = 0, folder=None, log=print) -> dict:
    """Loading a converted folder as the video command does (loading.video.load_video_flow, then
    device.prepare), timed on the deep block's first layer saved in the precision's dtype (quantized
    precisions: their bf16 folder quantized on the fly is not what is timed; the bytes are). The folder is
    written, dropped from the page cache where the OS allows it, then loaded: bytes a second, by which
    estimate_clip scales the whole command's weights (flow, text encoder, VAE)."""
    from ..loading.video import FORMAT, load_video_flow
    from ..loading.weights import save_model

    dtype, _ = precision(prec)
    flow = random_video_flow(arch, dtype, 1, seed, only="deep")
    weights = dict(tree_flatten(flow.parameters()))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = save_model(
            Path(tmp) / "flow",
            flow.config,
            weights,
            extra={"format": FORMAT, "video": flow.video.to_dict()},
        )
        nbytes = sum(v.nbytes for v in weights.values())
        del flow, weights
        gc.collect()
        mx.clear_cache()
        dropped = _drop_from_page_cache(out / "model.safetensors")
        t0 = time.perf_counter()
        loaded = device.prepare(load_video_flow(out))
        mx.eval(loaded.parameters())
        seconds = time.perf_counter() - t0
        del loaded
    gc.collect()
    mx.clear_cache()
    log(
        f"load ({dtype}, {nbytes / GB:.2f} GB, {'from disk' if dropped else 'page cache not dropped'}): "
        f"{seconds:.2f} s, {nbytes / seconds / GB:.2f} GB/s"
    )
    return {"seconds": seconds, "bytes": nbytes, "bytes_per_second": nbytes / seconds, "from_disk": dropped}


def denoise_macs(s: VideoShapes, frames: int) -> float:
    """Multiply-adds of one self-denoiser pass over `frames` latent frames and the text: its linears
    (12 x width^2 a position and layer) and its attention over every position (2 x S^2 x width)."""
    S = s.txt_size + frames * s.tokens_per_frame
    return s.denoiser_layers * (12 * S * s.denoiser_width**2 + 2 * S * S * s.denoiser_width)


def estimate_clip(measured: dict, s: VideoShapes, frames: Optional[int] = None, window: Optional[int] = None) -> dict:
    """The clip's time from a measured frame (measure_frame's result at the same precision and tokens
    per frame), and its whole-command peak per precision (computed). Seconds are None for a stage not
    measured."""
    frames = frames or measured["frames"]
    latent = s.latent_frames(frames)
    window = window_of(s, latent, window)
    st = measured["stages"]
    out = {"frames": frames, "latent_frames": latent, "window": window, "seconds": {}, "peaks": {}}
    if "deep" in st:
        # A token's cost is affine in its position: with the first frame timed too, every frame's cost is
        # on the line through the two (its prefix: the text and the frames before it, within the window).
        # Without it, the measured frame scales as a whole (an upper figure when it is the last).
        d = st["deep"]
        seen = [f if window is None else min(f, window - 1) for f in range(latent)]
        prefixes = [s.txt_size + k * s.tokens_per_frame for k in seen]
        p0 = d.get("prefix_first_frame")
        if p0 is not None and d["prefix"] != p0:
            slope = (d["seconds"] - d["seconds_first_frame"]) / (d["prefix"] - p0)
            out["seconds"]["deep"] = sum(d["seconds_first_frame"] + slope * (p - p0) for p in prefixes)
        else:
            out["seconds"]["deep"] = d["seconds"] * latent
    if "shallow" in st:  # streamed when the sequential sampler streams, else batched
        out["seconds"]["shallow"] = st["shallow"]["seconds"] * latent
    if "denoise" in st:
        seen = latent if window is None else min(window, latent)
        chunks = 1 if window is None else max(1, math.ceil((latent - seen) / max(1, seen - 1)) + 1)
        out["seconds"]["denoise"] = chunks * denoise_macs(s, seen) / st["denoise"]["macs_per_second"]
    if "decode" in st:
        out["seconds"]["decode"] = st["decode"]["seconds"] * latent
    if "text" in st:
        out["seconds"]["text"] = st["text"]["seconds"]
    if "load" in st:
        # the whole command's weights at the measured read speed: the flow in its precision, the text
        # encoder (float32 with a float32 flow, else bf16, as video_memory counts it), the VAE in float32
        dtype, bits = precision(measured["precision"])
        td = "float32" if dtype == "float32" else "bfloat16"
        total = s.flow.bytes(dtype, bits) + s.text.bytes(td) + s.vae.bytes("float32")
        out["load_bytes"] = total
        out["seconds"]["load"] = total / st["load"]["bytes_per_second"]
    out["total_seconds"] = sum(out["seconds"].values())
    decode = st["decode"]["bytes_per_pixel"] if "decode" in st else DECODE_BYTES_PER_PIXEL
    for prec in PRECISIONS:
        out["peaks"][prec] = whole_peak(stage_bytes(s, prec, frames, window, decode=decode))
    return out


def measure_text(
    arch: str,
    dtype: str = "float32",
    rows: int = 2,
    seed: int = 0,
    log=print,
    layers: Optional[int] = None,
    repeats: int = 1,
) -> dict:
    """The text encoder (random weights of the architecture's T5 shapes) on `rows` prompts of the flow's
    text length, the median of `repeats` runs after a warm-up. `layers`: built with at most that many
    layers, timed with its first and with all, extrapolated linearly to the architecture's."""
    s = arch_shapes(arch)
    t5c = dict(VIDEO_ARCHS[arch]["t5"])
    full = t5c.get("num_layers", T5Config.num_layers)
    n = min(full, layers) if layers else full
    t5 = randomize(T5Encoder(T5Config(**{**t5c, "num_layers": n})), getattr(mx, dtype), seed)
    for b in t5.blocks:
        mx.eval(b.parameters())
    mx.eval(t5.parameters())
    device.prepare(t5)
    mx.eval(t5.parameters())
    ids = mx.random.randint(0, 100, (rows, max(s.txt_size, 1)), key=mx.random.key(seed))
    mask = mx.ones(ids.shape, dtype=mx.bool_)

    def run():
        mx.eval(t5(ids, mask))  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(t5(ids, mask))
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    with Peak() as pk:
        t1, tn = _timed_layers(t5, n, run, attr="blocks")
    seconds = per_layer(t1, tn, n, full)
    log(
        f"text encoder ({dtype}, {rows} x {s.txt_size} tokens, {full} layers; {n} built): {seconds:.2f} s, "
        f"peak {pk.peak / GB:.2f} GB"
    )
    info = {"seconds": seconds, "seconds_1_layer": t1, "layers_timed": n}
    if n > 1:
        info[f"seconds_{n}_layers"] = tn
    return {**info, "peak_memory": pk.peak, "weights": _nbytes(t5), "dtype": dtype}


def summary_lines(measured: dict, clip: dict) -> list:
    st = measured["stages"]
    lines = [
        f"summary: one latent frame of {measured['tokens_per_frame']} tokens ({measured['size'][0]}x"
        f"{measured['size'][1]}), {measured['arch']} {measured['precision']}: "
        + ", ".join(f"{k} {v['seconds']:.2f} s" for k, v in st.items() if k not in ("text", "load"))
        + "; a clip of "
        + f"{clip['frames']} frames ({clip['latent_frames']} latent): about {clip['total_seconds'] / 60:.1f} min "
        + "("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in clip["seconds"].items())
        + " min)",
        "  whole-command peak of the clip (computed from the shapes): "
        + ", ".join(f"{p} {v / GB:.1f} GB" for p, v in clip["peaks"].items()),
    ]
    if measured.get("layers_built"):
        lines.append(
            f"  extrapolated per layer: every stage timed with its first layer and with its {measured['layers_built']} "
            "built, linear in the layers to the architecture's"
        )
    if "deep" in st and "seconds_first_frame" in st["deep"]:
        d = st["deep"]
        lines.append(
            f"  deep block: {d['seconds_first_frame']:.2f} s for the clip's first frame ({d['prefix_first_frame']} "
            f"positions before it), {d['seconds']:.2f} s for frame {measured['frame']} ({d['prefix']}); the clip's "
            "frames on the line through the two"
        )
    if measured.get("repeats", 1) > 1:
        lines.append(f"  times: medians of {measured['repeats']} runs")
    left = [k for k in ("text", "load", "deep", "shallow", "denoise", "decode") if k not in st]
    if left:
        lines.append(f"  not measured (left out of the time): {', '.join(left)}")
    return lines
