"""What depends on the device, in one place, applied once by the loaders.

The models compute the same numbers everywhere; only how their weights are held
and how much memory MLX may wire differs:

- CPU: float32 linear weights are held input-major, the faster layout for a CPU
  BLAS in the sampling step's 2-row products (MKL streams 20-23 GB/s this way
  against 13 GB/s, BENCHMARKS.md). The weight keeps its name and its (out, in)
  shape: it is the transposed view of an (in, out) buffer, so `weight.T` in
  nn.Linear is a plain row-major matrix for the BLAS, and the model can still be
  saved, quantized or converted again (those copy it back to the usual layout).
- CPU: quantized products compute in float32 (CPUQuantizedLinear says why).
- CPU: the VAEs' convolutions of large inputs run in strips of rows (vae.Conv2d
  says why; the Wan2.2 VAE's too, wan_vae.CausalConv3d): the decoder's memory stays
  near its weights.
- Metal: the wired memory limit is raised for models near the machine's
  recommended working set, as mlx-lm does, so the weights are not paged out
  between tokens.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def overlap() -> bool:
    """Whether the token loop should build token t+1's graph while token t computes
    (sample.py's `overlap`, as mlx-lm's generate_step does): on a GPU, where the CPU
    is otherwise idle; not on a CPU, where both compete for the same cores
    (BENCHMARKS.md, --compare-loop)."""
    return not on_cpu()


def input_major(model: nn.Module) -> int:
    """Hold the float32 weights of the transformer linears (those of `attn_blocks`,
    which carry the bandwidth) input-major, one at a time (no second copy of the
    model); returns how many changed."""
    n = 0
    for path, m in model.named_modules():
        if type(m) is nn.Linear and m.weight.dtype == mx.float32 and ".attn_blocks." in f".{path}":
            m.weight = mx.contiguous(m.weight.T).T
            mx.eval(m.weight)
            n += 1
    return n


class CPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computing in float32, for the CPU.

    MLX's CPU quantized matmul accumulates in the activations' dtype: with bf16
    activations an 8-bit product 3072 wide is off by 6% (12% at 12288 wide) where
    the same weights in float32 are off by 0.5%, and it is also ~7x slower than in
    float32. Metal accumulates in float32 whatever the dtype: there the layers stay
    MLX's own. Same parameters, same names: the model saves as before."""

    def __call__(self, x):
        if x.dtype == mx.float32:
            return super().__call__(x)
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


def float32_products(model: nn.Module) -> int:
    """Make every quantized linear of the model compute in float32; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            m.__class__ = CPUQuantizedLinear
            n += 1
    return n


# Elements of one convolution's unfolded input on a CPU (64 MB in float32); a larger
# input is convolved in strips of rows.
CONV_STRIP_ELEMENTS = 2**24


def conv_strips(model: nn.Module, elements: int = CONV_STRIP_ELEMENTS) -> int:
    """Let the convolutions that can (vae.Conv2d, wan_vae's) work in strips; returns how many."""
    n = 0
    for _, m in model.named_modules():
        if hasattr(type(m), "strip_elements"):
            m.strip_elements = elements
            n += 1
    return n


def wire_memory(model: nn.Module):
    """On Metal, let MLX wire the model's weights (mlx-lm's policy): raise the wired
    limit to the recommended working set when the model is a large part of it."""
    if on_cpu() or not mx.metal.is_available():
        return
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    limit = info["max_recommended_working_set_size"]
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if size > 0.9 * limit:
        print(
            f"[warning] the model ({size / 2**30:.1f} GB) is close to the recommended working set "
            f"({limit / 2**30:.1f} GB): generation may be slow. Consider --quantize 4."
        )
    mx.set_wired_limit(limit)


def prepare(model: nn.Module) -> nn.Module:
    """Apply the device's measures to a loaded model (a flow, a text encoder's
    transformer) once, as the loaders do; returns the model."""
    if on_cpu():
        input_major(model)
        float32_products(model)
        conv_strips(model)
    else:
        wire_memory(model)
    return model
