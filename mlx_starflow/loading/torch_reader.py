"""Read PyTorch checkpoints (`torch.save` zip files) without torch and without
running pickled code.

The unpickler only knows the handful of globals a tensor state dict needs
(OrderedDict, tensor rebuild functions, typed storages); any other global is
refused, so a hostile checkpoint cannot execute anything. Nothing in the file is
trusted: every zip entry is read with a bounded read after its declared sizes are
checked, and every tensor view (size, stride, offset) is checked against its
storage before it is built. Tensors come back as numpy arrays (bfloat16 as
`mx.array`, since numpy has no bfloat16).
"""

import io
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: says which file and why."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_DTYPE_NAMES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": "bfloat16",
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}

# Bounds on what a file may make us allocate. The pickle of a state dict is small (a 3B
# model's is under 1 MB). torch.save stores entries uncompressed; an archive compressed
# afterwards is accepted, but float weights never deflate by more than a few times, so
# an entry claiming more is a zip bomb. MLX shapes are int32.
MAX_PICKLE_BYTES = 256 << 20
MAX_INFLATE_RATIO = 32
INFLATE_SLACK = 1 << 20
MAX_DIM = 2**31 - 1
MAX_NDIM = 32
# Views may share a storage (tied weights) or repeat it (stride 0), so the tensors can
# hold more than the file; but not more than twice the file plus this.
VIEW_SLACK_BYTES = 256 << 20
_CHUNK = 1 << 20


class _Inert:
    """Objects the unpickler makes for us must not be rewritten by a BUILD opcode."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a tensor or storage carries pickled state")


class _StorageType(_Inert):
    def __init__(self, dtype):
        self.dtype = dtype


class _Storage(_Inert):
    def __init__(self, data: np.ndarray, bf16: bool, entry: str):
        self.data, self.bf16, self.entry = data, bf16, entry


class _View(_Inert):
    """A tensor as the pickle describes it: checked and built by _build."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage=None, offset=None, size=None, stride=None, *unused, **unused_kw):
    return _View(storage, offset, size, stride)


def _rebuild_parameter(data=None, *unused, **unused_kw):
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_view(view: _View) -> str:
    """Why the view cannot be built from its storage, or '' when it fits inside it."""
    if not isinstance(view.storage, _Storage):
        return "its storage is not a tensor storage of the file"
    size, stride, offset = view.size, view.stride, view.offset
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
        return "its size and stride are not two tuples of the same length"
    if len(size) > MAX_NDIM:
        return f"it has {len(size)} dimensions (at most {MAX_NDIM})"
    if not all(_is_int(s) and 0 <= s <= MAX_DIM for s in size):
        return f"its size {tuple(size)!r} is not a tuple of integers in 0..{MAX_DIM}"
    if not all(_is_int(s) and 0 <= s <= MAX_DIM for s in stride):
        return f"its stride {tuple(stride)!r} is not a tuple of integers in 0..{MAX_DIM}"
    n = view.storage.data.size
    if not _is_int(offset) or not 0 <= offset <= n:
        return f"its offset {offset!r} is outside its storage of {n} elements"
    if 0 in size:
        return ""
    last = offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= n:
        return (
            f"its view (offset {offset}, size {tuple(size)}, stride {tuple(stride)}) reaches element {last} "
            f"of a storage of {n} elements"
        )
    return ""


def _build(view: _View) -> np.ndarray:
    """The checked view as an array. Contiguous tensors stay views of the file's
    bytes: a large checkpoint is not held twice."""
    flat, offset = view.storage.data, view.offset
    size, stride = tuple(view.size), tuple(view.stride)
    numel = int(np.prod(size, dtype=object)) if size else 1
    if numel == 0:
        return np.zeros(size, dtype=flat.dtype)
    contiguous = tuple(int(np.prod(size[i + 1 :], dtype=object)) for i in range(len(size)))
    if all(st == c for d, st, c in zip(size, stride, contiguous) if d > 1) or numel == 1:
        return flat[offset : offset + numel].reshape(size)
    itemsize = flat.dtype.itemsize
    out = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * itemsize for s in stride])
    return np.array(out, copy=True)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, reader):
        super().__init__(file)
        self.reader = reader
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:  # UntypedStorage pickles carry a dtype
            return _StorageType(_DTYPE_NAMES[name])
        raise CheckpointError(
            f"{self.reader.path}: refusing to load '{module}.{name}': a checkpoint should hold only "
            "tensors (is this a full pickled model rather than a state dict?)"
        )

    def persistent_load(self, pid):
        path = self.reader.path
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{path}: unsupported persistent id {str(pid)[:80]!r} (not a tensor storage)")
        _, stype, key, _location, numel = pid
        if not isinstance(key, str) or not isinstance(stype, _StorageType):
            raise CheckpointError(f"{path}: storage {str(key)[:80]!r} has no known storage type")
        if not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{path}: storage '{key}' declares {str(numel)[:80]} elements")
        if (key, stype.dtype) not in self.storages:
            bf16 = stype.dtype == "bfloat16"
            dtype = np.dtype(np.uint16 if bf16 else stype.dtype)
            name = f"{self.reader.prefix}data/{key}"
            raw = self.reader.read(name, numel * dtype.itemsize)
            self.storages[key, stype.dtype] = _Storage(np.frombuffer(raw, dtype=dtype), bf16, name)
        storage = self.storages[key, stype.dtype]
        if storage.data.size != numel:
            raise CheckpointError(
                f"{path}: storage '{key}' is referenced with {numel} elements but holds {storage.data.size}"
            )
        return storage


class _Reader:
    """Bounded reads of the entries of one torch.save archive."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        self.file_size = path.stat().st_size
        self.prefix = ""

    def read(self, name: str, expected=None, limit=None) -> bytes:
        """The entry's bytes: exactly `expected` of them when given, at most `limit`.
        Sizes are checked from the zip directory before anything is inflated, and the
        read stops at the declared size whatever the data would inflate to."""
        path = self.path
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{path}: tensor data '{name}' is missing (truncated file?)") from None
        size = info.file_size
        if expected is not None and size != expected:
            raise CheckpointError(f"{path}: entry '{name}' holds {size} bytes but its tensor storage needs {expected}")
        if limit is not None and size > limit:
            raise CheckpointError(f"{path}: entry '{name}' declares {size} bytes (at most {limit} are read)")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: entry '{name}' is encrypted (not written by torch.save)")
        if info.header_offset + info.compress_size > self.file_size:
            raise CheckpointError(f"{path}: entry '{name}' extends past the end of the file (truncated file?)")
        if info.compress_type == zipfile.ZIP_STORED:
            if size != info.compress_size:
                raise CheckpointError(
                    f"{path}: entry '{name}' is stored uncompressed but declares {size} bytes in {info.compress_size}"
                )
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if size > MAX_INFLATE_RATIO * info.compress_size + INFLATE_SLACK:
                raise CheckpointError(
                    f"{path}: entry '{name}' would inflate {info.compress_size} bytes to {size} "
                    "(a zip bomb?); re-save the checkpoint with torch.save"
                )
        else:
            raise CheckpointError(
                f"{path}: entry '{name}' uses zip compression method {info.compress_type}; "
                "re-save the checkpoint with torch.save"
            )
        buf = bytearray()
        with self.zf.open(info) as f:
            while len(buf) < size:
                chunk = f.read(min(_CHUNK, size - len(buf)))
                if not chunk:
                    break
                buf += chunk
            extra = f.read(1)
        if len(buf) != size or extra:
            raise CheckpointError(f"{path}: entry '{name}' does not hold its declared {size} bytes (damaged file?)")
        return bytes(buf)


# What a damaged or hostile file makes the zip and pickle machinery raise. (TypeError
# and friends: a pickle calling the allowed globals with arguments of its choosing.)
_DAMAGED = (
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    ValueError,
    OSError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    UnicodeDecodeError,
    NotImplementedError,
    RecursionError,
    OverflowError,
)


def _check_opcodes(data: bytes):
    """Parse every opcode before unpickling: the C unpickler allocates a counted bytes
    or string before reading it, and grows its memo to the index a PUT names, so a
    length or index of 2^40 in a short pickle would be allocated."""
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= len(data):
            raise pickle.UnpicklingError(f"memo index {arg} in a pickle of {len(data)} bytes")


def _unwrap(obj):
    """Training checkpoints sometimes wrap the weights."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def load_pth(path) -> dict:
    """Load a `torch.save` state dict as {name: numpy array or mx.array (bf16)}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        zf = zipfile.ZipFile(path)
    except _DAMAGED:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (not a zip archive written by torch.save; "
            "the file may be truncated or of another format)"
        ) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkls:
            raise CheckpointError(f"{path}: no data.pkl inside: not a torch.save checkpoint")
        reader = _Reader(path, zf)
        reader.prefix = pkls[0][: -len("data.pkl")]
        try:
            data = reader.read(pkls[0], limit=MAX_PICKLE_BYTES)
            _check_opcodes(data)
            obj = _unwrap(_SafeUnpickler(io.BytesIO(data), reader).load())
        except CheckpointError:
            raise
        except _DAMAGED as e:
            raise CheckpointError(
                f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:200]}); the file may be truncated"
            ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    out, total = {}, 0
    budget = 2 * reader.file_size + VIEW_SLACK_BYTES
    for key, v in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a key is a {type(key).__name__}, not a name (not a state dict)")
        key_name = key if len(key) <= 200 else key[:200] + "..."
        if not isinstance(v, _View):
            raise CheckpointError(f"{path}: '{key_name}' is a {type(v).__name__}, not a tensor (not a flat state dict)")
        why = _check_view(v)
        if why:
            raise CheckpointError(f"{path}: tensor '{key_name}' cannot be read: {why}")
        total += int(np.prod(v.size, dtype=object)) * v.storage.data.itemsize
        if total > budget:
            raise CheckpointError(
                f"{path}: tensor '{key_name}': the views add up to {total} bytes, far more than the file's "
                f"{reader.file_size} (storages repeated by their strides)"
            )
        arr = _build(v)
        out[key] = mx.array(arr).view(mx.bfloat16) if v.storage.bf16 else arr
    return out
