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
