"""The one strict loader of every model: every checkpoint tensor used, every parameter loaded."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


class WeightsError(ValueError):
    """Weights that do not match the model (of any model here): names the keys."""


def _names(keys, limit=8):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights(model: nn.Module, weights: dict, source="checkpoint"):
    """Every parameter of the model present with its shape, and nothing else."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = set(expected) - set(weights)
    unexpected = set(weights) - set(expected)
    if missing:
        raise WeightsError(f"{source} is missing {len(missing)} tensors the model needs: {_names(missing)}")
    if unexpected:
        raise WeightsError(f"{source} has {len(unexpected)} tensors the model does not use: {_names(unexpected)}")
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k])})"
        for k in sorted(expected)
        if tuple(weights[k].shape) != tuple(expected[k])
    ]
    if wrong:
        raise WeightsError(f"{source} has tensors of the wrong shape: {'; '.join(wrong[:8])}")


def load_checked(model: nn.Module, weights: dict, source, dtype=None):
    """The one strict loader: check_weights, then load `weights` (already in the
    model's names: see each model's sanitize) with float weights cast to dtype."""
    check_weights(model, weights, source=str(source))
    model.load_weights([(k, _to_mx(v, dtype)) for k, v in weights.items()], strict=True)


def _to_mx(v, dtype=None):
    """An mx.array of v, floats cast to dtype (None keeps the checkpoint's own)."""
    a = v if isinstance(v, mx.array) else mx.array(v)
    return a.astype(dtype) if dtype is not None and mx.issubdtype(a.dtype, mx.floating) else a
