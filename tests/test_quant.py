import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_starflow.loading import device
from mlx_starflow.loading.device import CPUQuantizedLinear
from mlx_starflow.loading.quant import quant_args, quantizable, quantize_linear


def test_quantized_linear_accumulates_in_float32():
    # MLX's CPU quantized matmul accumulates in the activations' dtype (bf16: ~6% off
    # at this width); ours must stay within bf16 rounding of the float32 product.
    mx.random.seed(0)
    layer = nn.Linear(3072, 256)
    layer.update(
        {"weight": mx.random.uniform(-1, 1, (256, 3072)) / np.sqrt(3072), "bias": mx.random.uniform(-1, 1, (256,))}
    )
    layer.set_dtype(mx.bfloat16)  # a bf16 model: bf16 scales and biases
    for bits in (8, 4):
        q = CPUQuantizedLinear.from_linear(layer, 64, bits)
        assert type(q) is CPUQuantizedLinear
        f32 = [a.astype(mx.float32) for a in (q.scales, q.biases)]
        w = mx.dequantize(q.weight, *f32, 64, bits)
        x = mx.random.normal((3, 3072)).astype(mx.bfloat16)
        ref = np.array(mx.addmm(q.bias.astype(mx.float32), x.astype(mx.float32), w.T))
        ours = q(x)
        assert ours.dtype == mx.bfloat16
        err = np.sqrt(np.mean((np.array(ours.astype(mx.float32)) - ref) ** 2) / np.mean(ref**2))
        assert err < 1e-2, (bits, err)
        assert np.allclose(np.array(q(x.astype(mx.float32))), ref, rtol=1e-4, atol=1e-4)


def test_many_rows_dequantize_with_the_same_product_and_gradient(monkeypatch):
    # From DEQUANTIZE_ROWS rows the weight is dequantized for a BLAS product, a few of its
    # rows at a time (here 64 of 192: three pieces): the same numbers as the quantized
    # kernel in float32, and the same gradient for the input.
    monkeypatch.setattr(device, "DEQUANTIZE_ELEMENTS", 64 * 256)
    mx.random.seed(1)
    layer = nn.Linear(256, 192)
    layer.set_dtype(mx.bfloat16)
    for bits in (8, 4):
        q = CPUQuantizedLinear.from_linear(layer, 64, bits)
        for rows in (device.DEQUANTIZE_ROWS - 1, device.DEQUANTIZE_ROWS, 40):
            x = mx.random.normal((2, rows, 256))
            g = mx.random.normal((2, rows, 192))

            def kernel(v, q=q):
                return nn.QuantizedLinear.__call__(q, v)

            want, (gwant,) = mx.vjp(kernel, [x], [g])
            got, (ggot,) = mx.vjp(q, [x], [g])
            np.testing.assert_allclose(np.array(got[0]), np.array(want[0]), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.array(ggot), np.array(gwant), rtol=1e-4, atol=1e-4)


def test_quantize_linear_then_the_device_policy():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(48, 8))
    skipped = quantize_linear(model, bits=8, group_size=64)
    assert type(model.layers[0]) is nn.QuantizedLinear  # the model itself knows nothing of devices
    assert type(model.layers[2]) is nn.Linear and skipped == ["layers.2"]
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    device.prepare(model)  # what every loader does once
    expected = CPUQuantizedLinear if device.on_cpu() else nn.QuantizedLinear
    assert type(model.layers[0]) is expected
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names  # saves as before


def test_one_validator_of_bits_and_group_size():
    assert quant_args(None) is None and quant_args(0) is None
    assert quant_args(8) == {"bits": 8, "group_size": 64}
    assert quant_args({"bits": 4}) == {"bits": 4, "group_size": 64}
    assert quant_args({"bits": 4, "group_size": 128}) == {"bits": 4, "group_size": 128}
    for bad in (3, 6, True, "8", {"bits": 8, "group_size": 48}, {"bits": 8, "group": 64}, {"group_size": 64}):
        with pytest.raises(ValueError, match="4 or 8 bits with group size 32, 64, 128"):
            quant_args(bad)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_linear(nn.Linear(64, 8), bits=2, group_size=64)


def test_one_rule_for_which_layers():
    linear, embedding = nn.Linear(64, 8), nn.Embedding(10, 64)
    assert quantizable("blocks.0.attn_blocks.1.attention.qkv", linear, 64)
    assert quantizable("model.layers.0.self_attn.q_proj", linear, 32)
    assert not quantizable("blocks.0.attention.q", nn.Linear(48, 8), 64)  # input width
    for kept in ("blocks.3.proj_in", "blocks.3.proj_out", "blocks.3.proj_txt", "learnable_self_denoiser.proj_in"):
        assert not quantizable(kept, linear, 64)
    assert not quantizable("shared", embedding, 64)  # token embeddings only where asked (Gemma)
    assert quantizable("model.embed_tokens", embedding, 64, embeddings=True)
    assert not quantizable("norm", nn.LayerNorm(64), 64)
    # The flow's denoiser and blocks keep their outer projections, whatever the model
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model.proj_in = nn.Linear(64, 64)
    assert quantize_linear(model, bits=4, group_size=64, prefix="blocks.0.") == []
    assert type(model.proj_in) is nn.Linear and type(model.layers[0]) is nn.QuantizedLinear
