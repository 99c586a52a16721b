"""Read `.safetensors` files only after their header is checked.

MLX's loader trusts the header: overlapping tensors load, negative shapes wrap
around, a header length of 2^63 becomes a bare RuntimeError. Here the header is
read with bounded reads and checked first (length, a JSON object, known dtypes,
shapes, offsets inside the data and not overlapping), with a message naming the
file and the tensor; the `safetensors` library then validates it once more (it
also refuses holes between tensors) before MLX maps the file.
"""

import json
import math
import struct
from pathlib import Path

import mlx.core as mx
from safetensors import SafetensorError, safe_open

from .torch_reader import CheckpointError

# The safetensors library's own limit on the header.
MAX_HEADER_BYTES = 100_000_000
MAX_NDIM = 32
MAX_DIM = 2**31 - 1  # MLX shapes are int32

# The dtypes MLX loads faithfully, with their sizes in bytes. (MLX reads F8 as raw
# bytes and refuses F64: refused here with a message instead.)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "C64": 8,
}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"key '{_short(k)}' appears twice")
        seen[k] = v
    return seen


def _no_constant(name):
    raise ValueError(f"{name} is not a number")


def _short(name: str) -> str:
    return name if len(name) <= 200 else name[:200] + "..."


def read_header(path) -> dict:
    """The checked header of a safetensors file: {name: {"dtype", "shape",
    "data_offsets"}} (and "__metadata__" when present). CheckpointError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is past the end of the file ({size} bytes) or over the "
                    f"limit of {MAX_HEADER_BYTES} bytes (truncated or not a safetensors file?)"
                )
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(text) != n:
        raise CheckpointError(f"{path}: the header is shorter than its length {n} (truncated file?)")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, 5000-digit ints, deep nesting
        raise CheckpointError(f"{path}: the header is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        key = _short(name)
        if name == "__metadata__":  # (MLX writes null when there is none)
            entry = {} if entry is None else entry
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: '__metadata__' must map names to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor '{key}' must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(
                f"{path}: tensor '{key}' has dtype {str(dtype)[:40]!r}, not one of {', '.join(DTYPE_BYTES)}"
            )
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
            raise CheckpointError(f"{path}: tensor '{key}' has shape {str(shape)[:80]}, not a list of integers")
        if not all(0 <= d <= MAX_DIM for d in shape):
            raise CheckpointError(f"{path}: tensor '{key}' has shape {shape}: sizes must be in 0..{MAX_DIM}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor '{key}' has data_offsets {str(offsets)[:80]}, not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{path}: tensor '{key}' has data_offsets [{begin}, {end}] outside the data section of "
                f"{data_size} bytes (truncated file?)"
            )
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != need:
            raise CheckpointError(
                f"{path}: tensor '{key}' spans {end - begin} bytes but shape {shape} of {dtype} needs {need}"
            )
        spans.append((begin, end, key))
    spans.sort()
    for (_, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors '{k0}' and '{k1}' overlap (bytes {b1}..{min(e0, e1)})")
    # The format has no holes: the tensors tile the data section.
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise CheckpointError(f"{path}: tensor '{key}' starts at byte {begin}, leaving bytes {pos}..{begin} unused")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: {data_size - pos} bytes follow the last tensor (not a safetensors file?)")
    try:
        with safe_open(str(path), framework="numpy"):  # the library's own check of the header
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: {str(e)[:300]}") from None
    return header


def load_safetensors(path) -> dict:
    """{name: mx.array} of a safetensors file whose header passed read_header
    (loaded lazily by MLX, as mx.load does)."""
    read_header(path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read weights ({e}); the file may be truncated") from None
