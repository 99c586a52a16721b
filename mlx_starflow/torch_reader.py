"""Read PyTorch checkpoints (`torch.save` zip files) without torch and without
running pickled code.

The unpickler only knows the handful of globals a tensor state dict needs
(OrderedDict, tensor rebuild functions, typed storages); any other global is
refused, so a hostile checkpoint cannot execute anything. Tensors come back as
numpy arrays (bfloat16 as `mx.array`, since numpy has no bfloat16).
"""

import pickle
import zipfile
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


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    def __init__(self, data: np.ndarray):
        self.data = data


def _as_array(storage, offset, size, stride):
    """View `size` elements with `stride` starting at `offset` of a flat storage.
    Contiguous tensors stay views of the file's bytes: a large checkpoint is not
    held twice."""
    flat = storage.data
    size, stride = tuple(size), tuple(stride)
    numel = int(np.prod(size)) if size else 1
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if stride == contiguous or numel <= 1:
        return flat[offset : offset + numel].reshape(size)
    itemsize = flat.dtype.itemsize
    out = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=[s * itemsize for s in stride])
    return np.array(out, copy=True)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return (storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix, path):
        super().__init__(file)
        self.zf, self.prefix, self.path = zf, prefix, path
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
            f"{self.path}: refusing to load '{module}.{name}': a checkpoint should hold only "
            "tensors (is this a full pickled model rather than a state dict?)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        _, stype, key, _location, _numel = pid
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                raw = self.zf.read(name)
            except KeyError:
                raise CheckpointError(f"{self.path}: tensor data '{name}' is missing (truncated file?)") from None
            dtype = stype.dtype if isinstance(stype, _StorageType) else np.uint8
            if dtype == "bfloat16":
                self.storages[key] = _Storage(np.frombuffer(raw, dtype=np.uint16))
                self.storages[key].bf16 = True
            else:
                self.storages[key] = _Storage(np.frombuffer(raw, dtype=dtype))
        return self.storages[key]


def _finish(obj):
    if isinstance(obj, tuple) and len(obj) == 4 and isinstance(obj[0], _Storage):
        storage = obj[0]
        arr = _as_array(*obj)
        if getattr(storage, "bf16", False):
            return mx.array(arr).view(mx.bfloat16)
        return arr
    if isinstance(obj, dict):
        return OrderedDict((k, _finish(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_finish(v) for v in obj]
    return obj


def load_pth(path) -> dict:
    """Load a `torch.save` state dict as {name: numpy array or mx.array (bf16)}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (not a zip archive written by torch.save; "
            "the file may be truncated or of another format)"
        ) from None
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkls:
            raise CheckpointError(f"{path}: no data.pkl inside: not a torch.save checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            with zf.open(pkls[0]) as f:
                obj = _SafeUnpickler(f, zf, prefix, path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read checkpoint ({e}); the file may be truncated") from None
        obj = _finish(obj)
    # Training checkpoints sometimes wrap the weights.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            if key in obj and isinstance(obj[key], dict) and not _is_tensor(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(_is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    return dict(obj)


def _is_tensor(v):
    return isinstance(v, (np.ndarray, mx.array))
