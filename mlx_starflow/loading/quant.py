"""Quantization, one policy for every model (flow, T5, Gemma): which bits and group
sizes (quant_args), which layers (quantizable), with MLX's affine quantized layers."""

from typing import Optional

import mlx.nn as nn

# The choices measured in BENCHMARKS.md (precision per component); MLX also has 2, 3, 5
# and 6 bits: add them here, in this one place, once measured.
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# Linear layers kept in full precision: the flow's projections into and out of its
# transformer (patches, affine parameters, text), small and setting the affine maps.
FULL_PRECISION = ("proj_in", "proj_out", "proj_txt")


def quant_args(quantize) -> Optional[dict]:
    """The one validator of a quantization request: None (or 0) -> None; bits (4 or 8)
    -> {"bits", "group_size": 64}; {"bits", "group_size"} (group 32, 64 or 128) checked."""
    if quantize is None or quantize == 0:  # (False too)
        return None
    if isinstance(quantize, int) and not isinstance(quantize, bool):
        q = {"bits": quantize, "group_size": DEFAULT_GROUP_SIZE}
    elif isinstance(quantize, dict) and set(quantize) <= {"bits", "group_size"}:
        q = {"bits": quantize.get("bits"), "group_size": quantize.get("group_size", DEFAULT_GROUP_SIZE)}
    else:
        q = None
    if q is None or q["bits"] not in BITS or q["group_size"] not in GROUP_SIZES:
        raise ValueError(
            f"quantization must be {' or '.join(map(str, BITS))} bits with group size "
            f"{', '.join(map(str, GROUP_SIZES))}, not {quantize!r}"
        )
    return q


def quantizable(path: str, module, group_size: int, embeddings: bool = False) -> bool:
    """The one rule for which layers are quantized, in every model: linear layers
    (and token embeddings where the model asks: Gemma's 256k-row table) whose input
    width is a multiple of the group size, except the FULL_PRECISION ones."""
    if isinstance(module, nn.Embedding):
        kind = embeddings
    elif isinstance(module, nn.Linear):
        kind = path.rsplit(".", 1)[-1] not in FULL_PRECISION
    else:
        return False
    return kind and module.weight.shape[-1] % group_size == 0


def quantize(module: nn.Module, bits: int, group_size: int, class_predicate=None):
    """nn.quantize with the policy's arguments (MLX's affine quantized layers; on a CPU
    device.prepare makes their products float32)."""
    nn.quantize(module, group_size=group_size, bits=bits, class_predicate=class_predicate)


def quantize_linear(
    model: nn.Module, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE, embeddings=False, prefix: str = ""
) -> list:
    """Quantize in place the layers `quantizable` accepts; returns the paths of those
    it leaves in full precision because of their input width. `prefix` is the path of
    `model` inside a larger model (the rule and the returned paths see full paths)."""
    quant_args({"bits": bits, "group_size": group_size})

    def fits(path, module, group):
        return quantizable(prefix + path, module, group, embeddings)

    skipped = [prefix + p for p, m in model.named_modules() if fits(p, m, 1) and not fits(p, m, group_size)]
    quantize(model, bits, group_size, lambda p, m: fits(p, m, group_size))
    return skipped


def quantize_like(model: nn.Module, weights: dict, quantization: dict):
    """Give `model` the quantized layout of stored `weights` (the layers stored with
    `scales`) before loading them: a converted folder, an mlx-community checkpoint.
    The file decides here, not the policy (mlx-community also publishes 3 and 6 bits)."""
    quantize(
        model,
        quantization["bits"],
        quantization["group_size"],
        lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
    )
