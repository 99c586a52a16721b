"""`--dtype auto`: the flow's and the text encoder's precision, chosen for the device and its memory.

The device decides the order of preference: on a GPU (Metal, CUDA) bfloat16 or lower
(float32 models of up to a billion parameters stay as stored: they are small); on a
CPU float32 first, the fastest there (bf16 and quantized products do not go through
the BLAS: 6-18x slower per token, BENCHMARKS.md), then bfloat16, 8-bit, 4-bit. The
first whose whole-command peak fits in the memory the machine can give, with a
margin, is taken; the text encoder follows the flow (float32 with float32, bfloat16
with bfloat16, 8-bit with a quantized flow). Explicit choices win.

The peak is estimated, not measured, from the model folders' headers (nothing is loaded):

- weights: every tensor of the converted flow (the text encoder's and the VAE
  decoder's that are loaded) at the candidate precision; a quantized linear (the
  quantizable 2-D weights, quant.py's rule by name) costs bits/8 bytes a parameter
  plus a bf16 scale and bias per group of 64.
- activations of the largest stage: the flow's is 1.4x its deep block's KV cache
  (layers x 2 x (keys, values) x rows x positions x width; rows = 2 for one guided
  image), which matches the measured sampling-and-denoising peaks of the 3B to 3%
  (BENCHMARKS.md: 17.31 GB in float32 for 15.43 GB of weights and a 1.36 GB cache);
  the text encoder's is small (40 x rows x tokens x width x 4 bytes); the VAE decode's
  0.46 GB at 256x256 on a CPU (strips of rows), 2.25 GB on a GPU (one graph), in
  proportion to the pixels.
- one-shot (the commands, and `low_memory`): the largest stage's weights and
  activations; resident (a loaded Pipeline): the flow and the VAE's weights plus the
  largest stage's own memory.
- the margin: 10% of the memory, at least 1 GB (the interpreter, the libraries,
  MLX's allocator).

The memory: Metal's recommended working set (mx.device_info) on a Mac's GPU;
MemAvailable (/proc/meminfo) on Linux, or less when the process's memory cgroup
(a container's limit: v2 memory.max, v1 memory.limit_in_bytes, less its use) or its
RLIMIT_AS / RLIMIT_DATA leaves less; otherwise 3/4 of the physical memory.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx

from ..models.t5 import wanted as t5_wanted
from . import device
from .quant import DEFAULT_GROUP_SIZE, FULL_PRECISION
from .weights import read_config

GB = 1e9
BILLION_FLOAT32 = 4e9  # bytes: above a billion float32 parameters a GPU runs bfloat16
CACHE_FACTOR = 1.4  # the flow stage's activations over its KV cache (measured on the 3B)
DECODE_BYTES = {"cpu": 0.46e9, "gpu": 2.25e9}  # a 256x256 decode's activations above the VAE's weights
MARGIN = 0.10  # of the memory, at least MIN_MARGIN
MIN_MARGIN = 1e9


@dataclass
class Sizes:
    """A model's parameters: those a quantization would pack (linear) and the rest (plain),
    and their bytes as stored."""

    linear: int = 0
    plain: int = 0
    stored: int = 0
    float32: int = 0  # bytes of float32 tensors as stored

    def bytes(self, dtype: Optional[str], bits: Optional[int] = None, group: int = DEFAULT_GROUP_SIZE) -> float:
        """Bytes at a precision: dtype None keeps the stored bytes."""
        if dtype is None and not bits:
            return float(self.stored)
        width = 4 if dtype == "float32" else 2
        if not bits:
            return float(width * (self.linear + self.plain))
        return self.linear * bits / 8 + self.linear / group * 2 * 2 + width * self.plain


def _quantizable(name: str, shape) -> bool:
    parts = name.split(".")
    return (
        len(shape) == 2
        and parts[-1] == "weight"
        and len(parts) > 1
        and parts[-2] not in FULL_PRECISION
        and "embed" not in parts[-2]
        and shape[-1] % DEFAULT_GROUP_SIZE == 0
    )


def sizes_of(shapes: Dict[str, Tuple[str, tuple]]) -> Sizes:
    """Sizes of {name: (safetensors dtype, shape)}."""
    s = Sizes()
    for name, (dtype, shape) in shapes.items():
        n = 1
        for d in shape:
            n *= int(d)
        if _quantizable(name, shape):
            s.linear += n
        else:
            s.plain += n
        s.stored += n * DTYPE_BYTES.get(dtype, 4)
        if dtype == "F32":
            s.float32 += 4 * n
    return s


# Bytes per element of the safetensors dtypes (others count as 4).
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F64": 8, "I64": 8}


def read_header(path: Path) -> dict:
    """A safetensors file's header (its names, dtypes and shapes), read without its data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _header_shapes(path: Path, wanted=None) -> dict:
    out = {}
    for name, info in read_header(path).items():
        if name != "__metadata__" and (wanted is None or wanted(name)):
            out[name] = (info["dtype"], tuple(info["shape"]))
    return out


def folder_sizes(folder, wanted=None, prefix: str = "model") -> Optional[Sizes]:
    """Sizes of a folder's safetensors weights (one file or an index of shards), or of its
    largest other weight file as float32; None when there is none."""
    folder = Path(folder)
    index = folder / f"{prefix}.safetensors.index.json"
    files = []
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / f"{prefix}.safetensors").is_file():
        files = [folder / f"{prefix}.safetensors"]
    if files:
        shapes = {}
        for f in files:
            shapes.update(_header_shapes(f, wanted))
        return sizes_of(shapes)
    others = [p for p in folder.glob("*.bin")] + [p for p in folder.glob("*.pth")]
    if not others:
        return None
    n = max(p.stat().st_size for p in others) // 4
    return Sizes(plain=n, stored=4 * n, float32=4 * n)


def _vae_decoder(name: str) -> bool:
    return name.startswith(("decoder.", "post_quant_conv."))


def vae_sizes(folder) -> Optional[Sizes]:
    if folder is None:
        return None
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae").is_dir():
        folder = folder / "vae"
    return folder_sizes(folder, _vae_decoder, prefix="diffusion_pytorch_model")


@dataclass
class Shapes:
    """What the estimate needs of a model: its weights' sizes and its stages' shapes."""

    flow: Sizes
    deep_layers: int
    width: int
    positions: int  # image tokens + text tokens of the deep block
    pixels: int  # of one image
    text: Optional[Sizes] = None
    txt_size: int = 0
    txt_dim: int = 0
    vae: Optional[Sizes] = None
    quantized: bool = False  # the folder is already quantized: its precision is fixed

    @classmethod
    def of_config(cls, cfg, flow: Sizes, text: Optional[Sizes] = None, vae: Optional[Sizes] = None) -> "Shapes":
        tokens = (cfg.input_size // cfg.patch_size) ** 2
        side = cfg.image_size or cfg.input_size * cfg.pixels_per_latent
        return cls(
            flow=flow,
            deep_layers=int(cfg.layers_per_block[-1]),
            width=int(cfg.channels),
            positions=tokens + (cfg.txt_size or 0),
            pixels=side * side,
            text=text,
            txt_size=cfg.txt_size or 0,
            txt_dim=cfg.txt_dim or 0,
            vae=vae,
            quantized=bool(cfg.quantization),
        )

    @classmethod
    def of_folders(cls, flow_folder, text_folder=None, vae_folder=None) -> "Shapes":
        flow = folder_sizes(flow_folder)
        text = folder_sizes(Path(text_folder), t5_wanted) if text_folder is not None else None
        return cls.of_config(read_config(flow_folder), flow, text, vae_sizes(vae_folder))


@dataclass
class Choice:
    dtype: Optional[str]  # the flow's weights (None: as stored)
    quantize: Optional[int]
    text_dtype: str
    text_quantize: Optional[int]
    peak: float = 0.0  # bytes, the estimated whole-command peak
    memory: float = 0.0  # bytes the machine can give
    line: str = ""  # the choice and why, one line

    def label(self) -> str:
        flow = f"{self.quantize}-bit" if self.quantize else self.dtype or "as stored"
        text = f"{self.text_quantize}-bit" if self.text_quantize else self.text_dtype
        return f"flow {flow}, text encoder {text}"


def stage_peaks(shapes: Shapes, dtype, bits, text_dtype, text_bits, gpu: bool, rows: int = 2) -> dict:
    """Each stage's weights and activations (bytes) at a precision, for `rows` rows (one
    guided image: 2)."""
    act = 4 if (dtype == "float32" or (dtype is None and not bits and shapes.flow.float32)) else 2
    cache = 2 * shapes.deep_layers * rows * shapes.positions * shapes.width * act
    flow_w = shapes.flow.bytes(dtype, bits)
    out = {"flow": (flow_w, CACHE_FACTOR * cache)}
    if shapes.text is not None:
        text_w = shapes.text.bytes(text_dtype, text_bits)
        out["text"] = (text_w, 40 * rows * shapes.txt_size * max(shapes.txt_dim, 1) * 4)
    if shapes.vae is not None:
        decode = DECODE_BYTES["gpu" if gpu else "cpu"] * shapes.pixels / 65536
        out["vae"] = (shapes.vae.bytes("float32"), decode)
    return out


def whole_peak(peaks: dict, one_shot: bool) -> float:
    """The command's peak: the largest stage's (one-shot), or the resident weights plus
    the largest stage's own memory."""
    own = max(w + a for w, a in peaks.values())
    if one_shot:
        return own
    resident = sum(peaks[k][0] for k in ("flow", "vae") if k in peaks)
    text = sum(peaks.get("text", (0, 0)))
    return resident + max(text, peaks["flow"][1], peaks.get("vae", (0, 0))[1])


def text_follows(dtype: Optional[str], bits: Optional[int], stored_float32: bool) -> Tuple[str, Optional[int]]:
    """The text encoder's precision for a flow's: 8-bit with a quantized flow, else the flow's dtype."""
    if bits:
        return "float32", 8
    if dtype == "bfloat16" or dtype == "float16" or (dtype is None and not stored_float32):
        return "bfloat16", None
    return "float32", None


UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2^63


def _number(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_file_use(folder: Path, key: str) -> int:
    """The page cache a cgroup's usage counts (reclaimable), from its memory.stat."""
    try:
        stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        return int(stat.get(key, 0))
    except (OSError, ValueError):
        return 0


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")):
    """(bytes the process's memory cgroup can still give, its file) or None without a limit:
    the smallest limit on the way from the process's cgroup up to the root (cgroup v2's
    memory.max, v1's memory.limit_in_bytes) less what that cgroup uses, page cache not
    counted (the kernel reclaims it)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy
            mount, limit_name, usage_name, cache_key = root, "memory.max", "memory.current", "file"
        elif "memory" in controllers.split(","):
            mount, limit_name, usage_name, cache_key = (
                root / "memory",
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "cache",
            )
        else:
            continue
        folder = mount / path.strip("/")
        while True:
            limit = _number(folder / limit_name)
            if limit is not None and limit < UNLIMITED:
                used = (_number(folder / usage_name) or 0) - _cgroup_file_use(folder, cache_key)
                room = max(limit - max(used, 0), 0)
                if best is None or room < best[0]:
                    best = (float(room), f"the cgroup's {limit_name}")
            if folder == mount or folder.parent == folder:
                break
            folder = folder.parent
    return best


def rlimit_room(getrlimit=None, status: Path = Path("/proc/self/status")):
    """(bytes left under the process's RLIMIT_AS or RLIMIT_DATA, its name) or None when
    neither is set: the soft limit less the address space (VmSize) or data (VmData) in use."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    getrlimit = getrlimit or resource.getrlimit
    try:
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    except OSError:
        fields = {}
    best = None
    for name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        soft = getrlimit(getattr(resource, name))[0]
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        try:
            used = int(fields[field].split()[0]) * 1024
        except (KeyError, ValueError, IndexError):
            used = 0
        room = max(soft - used, 0)
        if best is None or room < best[0]:
            best = (float(room), name)
    return best


def system_memory() -> Tuple[float, str]:
    """(bytes the system has free, where the figure comes from): MemAvailable on Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return float(fields["MemAvailable"].split()[0]) * 1024, "MemAvailable"
    except (OSError, KeyError, ValueError):
        pass
    try:
        return 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "3/4 of the physical memory"
    except (ValueError, OSError, AttributeError):
        return 8 * GB, "unknown (assumed 8 GB)"


def memory() -> Tuple[float, str]:
    """(bytes the machine can give, where the figure comes from): on a CPU the smallest of
    the system's (MemAvailable), the process's memory cgroup's and its RLIMIT_AS /
    RLIMIT_DATA room, so that a container's limit is what the choice fits in."""
    if not device.on_cpu() and mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        size = info.get("max_recommended_working_set_size") or 0.75 * info.get("memory_size", 0)
        return float(size), "the GPU's recommended working set"
    found = system_memory()
    for limit in (cgroup_room(), rlimit_room()):
        if limit is not None and limit[0] < found[0]:
            found = limit
    return found


def candidates(shapes: Shapes, gpu: bool) -> list:
    """(dtype, bits) from the highest precision down, for the device."""
    if shapes.quantized:
        return [(None, None)]
    if gpu:
        stored = [(None, None)] if shapes.flow.float32 <= BILLION_FLOAT32 else []
        return stored + [("bfloat16", None), ("bfloat16", 8), ("bfloat16", 4)]
    return [("float32", None), ("bfloat16", None), ("bfloat16", 8), ("bfloat16", 4)]


def choose(
    shapes: Shapes,
    gpu: Optional[bool] = None,
    available: Optional[float] = None,
    one_shot: bool = True,
    dtype: Optional[str] = "auto",
    quantize: Optional[int] = None,
    text_dtype: str = "auto",
    text_quantize: Optional[int] = None,
    source: str = "",
) -> Choice:
    """The precision for the device (gpu: default the default device is not the CPU) and the
    memory (available bytes: default `memory()`). Explicit dtype / quantize / text_dtype /
    text_quantize win; "auto" (and None quantization with it) is the policy's."""
    gpu = (not device.on_cpu()) if gpu is None else gpu
    if available is None:
        available, source = memory()
    margin = max(MIN_MARGIN, MARGIN * available)
    where = "GPU" if gpu else "CPU"
    stored32 = shapes.flow.float32 > 0.5 * shapes.flow.stored
    text_auto = text_dtype == "auto" and text_quantize is None
    if dtype == "auto" and quantize is None:
        options = candidates(shapes, gpu)
    else:
        d = dtype
        if d == "auto":  # an explicit quantization: the rest as before, bf16 above 1B float32 parameters
            d = "bfloat16" if shapes.flow.float32 > BILLION_FLOAT32 else None
        options = [(d, quantize)]
    picked = None
    for d, bits in options:
        td, tb = text_follows(d, bits, stored32) if text_auto else (text_dtype, text_quantize)
        if td == "auto":
            td = "float32"
        peak = whole_peak(stage_peaks(shapes, d, bits, td, tb, gpu), one_shot)
        picked = Choice(d, bits, td, tb, peak, available)
        if peak + margin <= available:
            break
    fits = picked.peak + margin <= available
    how = "one-shot" if one_shot else "resident"
    given = "" if dtype == "auto" and quantize is None else "as given; "
    why = (
        "float32 is the fastest on a CPU"
        if not gpu and picked.dtype == "float32"
        else "the highest precision that fits"
        if len(options) > 1
        else "fixed by the folder or the options"
    )
    verdict = "fits" if fits else "does NOT fit (try a smaller precision or --low-memory)"
    picked.line = (
        f"precision: {picked.label()} ({given}{where}: {why}; {how} peak about {picked.peak / GB:.1f} GB "
        f"{verdict} in {available / GB:.1f} GB{' (' + source + ')' if source else ''} with a "
        f"{margin / GB:.1f} GB margin)"
    )
    return picked


# -- video models (STARFlow-V) ---------------------------------------------------------------

# The Wan2.2 VAE's decode of one latent frame above its weights, per pixel of one video frame:
# 14.3 KB on a CPU with its convolutions in strips, the frame caches included (BENCHMARKS.md;
# not measured on Metal). tools/video_memory.py's tables take the same figure.
VIDEO_DECODE_BYTES_PER_PIXEL = 14_300.0
# One layer of the video self-denoiser at once: about 20 widths a position at peak (its input,
# normed input, qkv, rotated q and k, attention output and projection, the MLP's hidden units).
VIDEO_DENOISE_ACT = 20


@dataclass
class ClipShapes:
    """What the video estimate needs of a model and its default clip (the training length
    at the default size, guided): the weights' sizes and the deep block's KV cache."""

    flow: Sizes
    deep_layers: int
    deep_kv_heads: int
    head_dim: int
    positions: int  # the deep block's cache: the text and the latent frames it holds
    pixels: int  # of one video frame
    text: Optional[Sizes] = None
    txt_size: int = 0
    txt_dim: int = 0
    vae: Optional[Sizes] = None
    quantized: bool = False
    denoiser_heads: int = 0  # the learned self-denoiser's (0: none), over the deep cache's positions
    denoiser_width: int = 0


def clip_peaks(shapes: ClipShapes, dtype, bits, text_dtype, text_bits, gpu: bool = True, rows: int = 2) -> dict:
    """Each stage's weights and activations (bytes) at a precision, as tools/video_memory.py
    counts them (its largest terms): sampling's is the deep block's KV cache, in the
    activations' dtype (float32 for a float32 flow, else bf16, a quantized flow's included);
    the self-denoiser's its S x S frame mask and one layer's activations, and on a CPU the
    attention scores (heads x S x S: MLX's CPU attention with a mask holds them); the text
    encoder's; the VAE decode of one latent frame."""
    act = 4 if (dtype == "float32" or (dtype is None and not bits and shapes.flow.float32)) else 2
    S = shapes.positions
    cache = 2 * shapes.deep_layers * rows * shapes.deep_kv_heads * S * shapes.head_dim * act
    if shapes.denoiser_heads:
        scores = 0 if gpu else shapes.denoiser_heads * S * S * act
        cache = max(cache, 4 * S * S, S * S + VIDEO_DENOISE_ACT * S * shapes.denoiser_width * act + scores)
    out = {"flow": (shapes.flow.bytes(dtype, bits), cache)}
    if shapes.text is not None:
        out["text"] = (
            shapes.text.bytes(text_dtype, text_bits),
            40 * rows * shapes.txt_size * max(shapes.txt_dim, 1) * 4,
        )
    if shapes.vae is not None:
        out["vae"] = (shapes.vae.bytes("float32"), VIDEO_DECODE_BYTES_PER_PIXEL * shapes.pixels)
    return out


def choose_video(
    shapes: ClipShapes,
    gpu: Optional[bool] = None,
    available: Optional[float] = None,
    dtype: Optional[str] = "auto",
    quantize: Optional[int] = None,
    text_dtype: str = "auto",
    text_quantize: Optional[int] = None,
    source: str = "",
) -> Choice:
    """`choose` for a video model, whose flow and VAE stay loaded (the video pipeline's
    way): the highest precision for the device whose estimated peak for the model's own
    clip fits the memory with the margin (else the lowest, said not to fit: a local
    attention window bounds the cache). Explicit choices win; the text encoder follows
    the flow unless given."""
    gpu = (not device.on_cpu()) if gpu is None else gpu
    if available is None:
        available, source = memory()
    margin = max(MIN_MARGIN, MARGIN * available)
    stored32 = shapes.flow.float32 > 0.5 * shapes.flow.stored
    auto = dtype == "auto" and quantize is None
    if auto:
        options = candidates(shapes, gpu)
    elif dtype == "auto":  # an explicit quantization: the rest as stored, bf16 above 1B float32 parameters
        options = [("bfloat16" if shapes.flow.float32 > BILLION_FLOAT32 else None, quantize)]
    else:
        options = [(dtype, quantize)]
    text_auto = text_dtype == "auto" and text_quantize is None
    for d, bits in options:
        td, tb = text_follows(d, bits, stored32) if text_auto else (text_dtype, text_quantize)
        td = "float32" if td == "auto" else td
        picked = Choice(d, bits, td, tb, whole_peak(clip_peaks(shapes, d, bits, td, tb, gpu), False), available)
        if picked.peak + margin <= available:
            break
    lower = "" if picked.quantize == 4 else "--quantize 4 or "
    verdict = "fits" if picked.peak + margin <= available else f"does NOT fit (try {lower}a --local-attn-window)"
    why = "the highest precision that fits" if auto else "as given"
    if auto and not gpu and picked.dtype == "float32":
        why = "float32 is the fastest on a CPU"
    picked.line = (
        f"precision: {picked.label()} ({'GPU' if gpu else 'CPU'}: {why}; the model's own clip peaks at about "
        f"{picked.peak / GB:.1f} GB, {verdict} in {available / GB:.1f} GB{' (' + source + ')' if source else ''} "
        f"with a {margin / GB:.1f} GB margin)"
    )
    return picked
