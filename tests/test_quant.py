import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_starflow.quant import QuantizedLinear, quantize_linear


def test_quantized_linear_accumulates_in_float32():
    # MLX's CPU quantized matmul accumulates in the activations' dtype (bf16: ~6% off
    # at this width); ours must stay within bf16 rounding of the float32 product.
    mx.random.seed(0)
    layer = nn.Linear(3072, 256)
    layer.update({"weight": mx.random.uniform(-1, 1, (256, 3072)) / np.sqrt(3072),
                  "bias": mx.random.uniform(-1, 1, (256,))})
    layer.set_dtype(mx.bfloat16)  # a bf16 model: bf16 scales and biases
    for bits in (8, 4):
        q = QuantizedLinear.from_linear(layer, 64, bits)
        f32 = [a.astype(mx.float32) for a in (q.scales, q.biases)]
        w = mx.dequantize(q.weight, *f32, 64, bits)
        x = mx.random.normal((3, 3072)).astype(mx.bfloat16)
        ref = np.array(mx.addmm(q.bias.astype(mx.float32), x.astype(mx.float32), w.T))
        ours = q(x)
        assert ours.dtype == mx.bfloat16
        err = np.sqrt(np.mean((np.array(ours.astype(mx.float32)) - ref) ** 2) / np.mean(ref**2))
        assert err < 1e-2, (bits, err)
        assert np.allclose(np.array(q(x.astype(mx.float32))), ref, rtol=1e-4, atol=1e-4)


def test_quantize_linear_makes_ours():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(48, 8))
    skipped = quantize_linear(model, bits=8, group_size=64)
    assert type(model.layers[0]) is QuantizedLinear
    assert type(model.layers[2]) is nn.Linear and skipped == ["layers.2"]
