"""The KV cache of one attention layer: preallocated, written in place, rewindable.

Keys are stored already rotated, so a step never touches earlier entries; the
full-length buffers are allocated once per sampled block, so nothing is copied
as the prefix grows. The CFG batch (conditional rows, then unconditional rows)
lives in the same buffers.
"""

import mlx.core as mx


class KVCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype=mx.float32):
        self.keys = mx.zeros((batch, kv_heads, max_len, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, kv_heads, max_len, head_dim), dtype=dtype)
        self.max_len = max_len
        self.offset = 0

    def update(self, k: mx.array, v: mx.array):
        """Append k, v (B, kv_heads, n, head_dim); return all keys and values so far."""
        start, end = self.offset, self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len} allocated")
        self.keys[:, :, start:end, :] = k
        self.values[:, :, start:end, :] = v
        self.offset = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def rewind(self, n: int):
        """Forget the last n positions (a Jacobi iteration that did not converge)."""
        self.offset = max(0, self.offset - n)

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def kv_group_size(head_dim: int, group_size: int = 64) -> int:
    """The quantization group along a head's width: `group_size`, or the head's width when narrower."""
    g = min(group_size, head_dim)
    if head_dim % g or g not in (32, 64, 128):
        raise ValueError(f"a quantized KV cache needs a head width that is a multiple of 32, not {head_dim}")
    return g


class QuantizedKVCache(KVCache):
    """The same cache with keys and values held at `bits` bits: each head's vector is
    quantized in groups of `group_size` (an affine grid per group, scale and offset in the
    activations' dtype, as mx.quantize makes it) as it is written, and the positions
    attended to are dequantized for attention. Preallocated, written in place and
    rewindable like KVCache; at 8 bits and groups of 64 it holds 1.06 bytes per value
    (bf16 scales) against 2 in bf16 and 4 in float32."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype=mx.float32, bits: int = 8):
        self.bits, self.group_size = bits, kv_group_size(head_dim)
        self.dtype = dtype
        shape = (batch, kv_heads, max_len)
        words = head_dim * bits // 32
        groups = head_dim // self.group_size

        def buffers():
            return [
                mx.zeros((*shape, words), dtype=mx.uint32),
                mx.zeros((*shape, groups), dtype=dtype),
                mx.zeros((*shape, groups), dtype=dtype),
            ]

        self.keys, self.values = buffers(), buffers()
        self.max_len = max_len
        self.offset = 0

    def _write(self, buffers, x, start, end):
        for buf, part in zip(buffers, mx.quantize(x, group_size=self.group_size, bits=self.bits)):
            buf[:, :, start:end, :] = part

    def _read(self, buffers, end):
        w, s, b = (buf[:, :, :end, :] for buf in buffers)
        return mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits).astype(self.dtype)

    def update(self, k: mx.array, v: mx.array):
        start, end = self.offset, self.offset + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > {self.max_len} allocated")
        self._write(self.keys, k.astype(self.dtype), start, end)
        self._write(self.values, v.astype(self.dtype), start, end)
        self.offset = end
        return self._read(self.keys, end), self._read(self.values, end)

    @property
    def state(self):
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.keys + self.values)


def make_cache(batch: int, kv_heads: int, max_len: int, head_dim: int, dtype=mx.float32, bits=None) -> KVCache:
    """A float cache (bits None) or a quantized one."""
    if bits is None:
        return KVCache(batch, kv_heads, max_len, head_dim, dtype)
    return QuantizedKVCache(batch, kv_heads, max_len, head_dim, dtype, bits)
