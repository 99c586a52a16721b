"""The T5 encoder (FLAN-T5, T5 v1.1 and the original T5) in MLX.

Loads the encoder half of a Hugging Face T5 checkpoint as published: a full
`T5ForConditionalGeneration` or a `T5EncoderModel`, as `model.safetensors`,
sharded safetensors with an index, or `pytorch_model.bin` (sharded or not).
The decoder and `lm_head` are dropped before anything is read into memory where
the format allows it.
"""

import math
import re
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    num_heads: int = 8
    d_ff: int = 2048
    num_layers: int = 6
    feed_forward_proj: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, params: dict) -> "T5Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @property
    def gated(self) -> bool:
        parts = self.feed_forward_proj.split("-")
        return len(parts) == 2 and parts[0] == "gated"

    @property
    def activation(self) -> str:
        # As in transformers: "gated-gelu" means the tanh approximation.
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]


_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "silu": nn.silu,
    "swish": nn.silu,
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) for a length x length grid.

    Computed in float32 numpy the way transformers does it in float32 torch, so
    positions on a bucket boundary land in the same bucket.
    """
    pos = np.arange(length)
    rel = pos[None, :] - pos[:, None]
    num_buckets //= 2
    buckets = (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):
        scaled = np.log(rel.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact))
    scaled = scaled * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(rel < max_exact, rel, large)


class RMSNorm(nn.Module):
    # T5's layer norm: no mean subtraction, no bias.
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.d_kv * config.num_heads
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x, bias):
        B, L, _ = x.shape
        q = self.q(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        # T5 folds the 1/sqrt(d) scale into its init, so scores are unscaled;
        # softmax in float32 as transformers does.
        scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) + bias
        weights = mx.softmax(scores, axis=-1).astype(v.dtype)
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o(out)


class FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ValueError(
                f"T5 feed_forward_proj {config.feed_forward_proj!r}: activation "
                f"{config.activation!r} is not supported (one of {sorted(_ACTIVATIONS)})"
            )
        self.gated = config.gated
        self.act = _ACTIVATIONS[config.activation]
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x):
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.mlp = FeedForward(config)

    def __call__(self, x, bias):
        x = x + self.attention(self.attn_norm(x), bias)
        return x + self.mlp(self.mlp_norm(x))


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        # Only the first layer has a relative position table; all layers use it.
        self.relative_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = [Block(config) for _ in range(config.num_layers)]
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def width(self) -> int:
        return self.config.d_model

    def position_bias(self, length: int) -> mx.array:
        buckets = relative_position_buckets(
            length,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        bias = self.relative_bias(mx.array(buckets))  # (L, L, heads)
        return bias.transpose(2, 0, 1)[None].astype(mx.float32)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array = None) -> mx.array:
        """Final hidden states (batch, length, d_model), padding rows not zeroed."""
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            keep = (attention_mask != 0)[:, None, None, :]
            bias = mx.where(keep, bias, mx.finfo(mx.float32).min)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)


# Hugging Face names of the encoder's weights -> names in T5Encoder.
_KEY_PATTERNS = [
    (r"shared\.weight", "shared.weight"),
    (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", "relative_bias.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attention.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.mlp_norm.weight"),
    (r"encoder\.final_layer_norm\.weight", "final_norm.weight"),
]


def wanted(key: str) -> bool:
    return not key.startswith(("decoder.", "lm_head."))


def sanitize(weights: dict) -> dict:
    """Rename the encoder's Hugging Face keys; an unknown key is an error."""
    out = {}
    for key, value in weights.items():
        if not wanted(key):
            continue
        if key == "encoder.embed_tokens.weight":
            # The encoder's embedding is `shared` itself (tied in transformers).
            if "shared.weight" not in weights:
                out["shared.weight"] = value
            continue
        for pattern, repl in _KEY_PATTERNS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise ValueError(f"unknown T5 encoder weight {key!r}")
    return out
