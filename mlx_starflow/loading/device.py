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

from functools import lru_cache

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


# Rows from which a quantized product on the CPU dequantizes its weight and multiplies
# through the BLAS: MLX's CPU quantized matmul runs at about 2.4 GFLOP/s on 1152 rows
# here (3072 -> 12288, 4-bit), dequantizing then multiplying at about 50 (BENCHMARKS.md);
# on fewer rows (the token loop's 2) the quantized kernel is faster and reads 4-8x less.
DEQUANTIZE_ROWS = 8
# Elements of a weight dequantized at a time (8 MB in float32): MLX's CPU dequantize holds
# about twice its result, and a 3B layer's weights are 0.6 GB in float32.
DEQUANTIZE_ELEMENTS = 2**21


@lru_cache(maxsize=None)
def dequantized_product(group_size: int, bits: int, mode: str):
    """x @ W.T for a quantized W (packed words, scales, biases), computed in float32 through
    the BLAS a few output rows of W at a time: each piece dequantized, used and dropped
    before the next is made (mx.depends orders them; left to itself MLX may dequantize
    every piece first). Its vjp dequantizes the pieces again rather than keeping the
    forward's. No gradient for the weights."""
    f32 = mx.float32

    def pieces(w, scales, biases):
        step = max(1, DEQUANTIZE_ELEMENTS * bits // (32 * w.shape[1]))
        for i in range(0, w.shape[0], step):
            yield i, i + step, w[i : i + step], scales[i : i + step].astype(f32), biases[i : i + step].astype(f32)

    def dequantize(w, scales, biases, after):
        if after is not None:  # not before the previous piece's product
            w = mx.depends(w, after)
        return mx.dequantize(w, scales, biases, group_size, bits, mode=mode)

    @mx.custom_function
    def product(x, w, scales, biases):
        outs = []
        for _, _, wi, si, bi in pieces(w, scales, biases):
            outs.append(x @ dequantize(wi, si, bi, outs[-1] if outs else None).T)
        return mx.concatenate(outs, axis=-1)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        gx = None
        for i, j, wi, si, bi in pieces(w, scales, biases):
            term = cotangent[..., i:j] @ dequantize(wi, si, bi, gx)
            gx = term if gx is None else gx + term
        return gx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return product


class CPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computing in float32, for the CPU.

    MLX's CPU quantized matmul accumulates in the activations' dtype: with bf16
    activations an 8-bit product 3072 wide is off by 6% (12% at 12288 wide) where
    the same weights in float32 are off by 0.5%, and it is also ~7x slower than in
    float32. Metal accumulates in float32 whatever the dtype: there the layers stay
    MLX's own. From DEQUANTIZE_ROWS rows (a text prefix, Jacobi chunks, a density pass)
    the weight is dequantized for the product (dequantized_product). Same parameters,
    same names: the model saves as before."""

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(mx.float32)
        if x.size >= DEQUANTIZE_ROWS * x.shape[-1] and self.mode == "affine" and self.get("biases") is not None:
            y = dequantized_product(self.group_size, self.bits, self.mode)(x, self.weight, self.scales, self.biases)
            if "bias" in self:
                y = y + self.bias
        else:
            y = super().__call__(x)
        return y if dtype == mx.float32 else y.astype(dtype)


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
