"""Token positions and rotary angles for the flow blocks.

Image token (r, c) of an h x w grid sits at (r*s/sqrt(hw), c*s/sqrt(hw), 0) and text
token k of L at (0, 0, k*s/L), with s = pt_seq_len. Positions follow the natural
(unpermuted) order: a flipped block uses position t for its t-th token.
"""

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

THETA = 10000.0
TEXT_DIMS = 8  # rotary pairs given to the text axis when the model has text


@lru_cache(maxsize=32)
def _angles(head_dim: int, h: int, w: int, txt_len: int, model_has_text: bool, pt_seq_len: int):
    half = head_dim // 2  # one angle per rotated pair
    mean_len = math.sqrt(h * w)
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px = (r.reshape(-1) / mean_len * pt_seq_len)[:, None]
    py = (c.reshape(-1) / mean_len * pt_seq_len)[:, None]
    if not model_has_text:
        dim = half
        f = THETA ** (-np.arange(0, dim, 2)[: dim // 2] / dim)
        return np.concatenate([px * f, py * f], axis=1)
    dim = half - TEXT_DIMS
    f = THETA ** (-np.arange(0, dim, 2)[: dim // 2] / dim)
    g = THETA ** (-np.arange(TEXT_DIMS) / TEXT_DIMS)
    img = np.concatenate([px * f, py * f, np.zeros_like(px) * g], axis=1)
    if txt_len == 0:
        return img
    pt = (np.arange(txt_len) / txt_len * pt_seq_len)[:, None]
    txt = np.concatenate([np.zeros((txt_len, dim)), pt * g], axis=1)
    return np.concatenate([txt, img], axis=0)


def rope_table(head_dim, h, w, txt_len, model_has_text, pt_seq_len):
    """(cos, sin), each (txt_len + h*w, head_dim/2) float32: text positions first."""
    a = _angles(head_dim, h, w, txt_len, model_has_text, pt_seq_len)
    return mx.array(np.cos(a), dtype=mx.float32), mx.array(np.sin(a), dtype=mx.float32)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x0, x1) of x (..., T, head_dim) by per-token angles (T, head_dim/2)."""
    shape = x.shape
    pairs = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(shape).astype(x.dtype)


@lru_cache(maxsize=32)
def _angles_1d(head_dim: int, length: int):
    f = THETA ** (-np.arange(0, head_dim, 2)[: head_dim // 2] / head_dim)
    return np.arange(length)[:, None] * f


@lru_cache(maxsize=32)
def rope_table_1d(head_dim: int, length: int):
    """(cos, sin), each (length, head_dim/2) float32, for positions 0..length-1: the
    standard 1-D RoPE of the language-model deep block (text tokens, then image tokens)."""
    a = _angles_1d(head_dim, length)
    return mx.array(np.cos(a), dtype=mx.float32), mx.array(np.sin(a), dtype=mx.float32)


def apply_rope_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the pairs (x[i], x[i + head_dim/2]) (Hugging Face's rotate-half) of x
    (..., T, head_dim) by per-token angles (T, head_dim/2)."""
    half = x.shape[-1] // 2
    xf = x.astype(mx.float32)
    x0, x1 = xf[..., :half], xf[..., half:]
    return mx.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).astype(x.dtype)
