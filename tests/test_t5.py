"""The MLX T5 encoder against transformers on tiny random checkpoints."""

import itertools
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from mlx_starflow.loading.text import load_t5, read_weights
from mlx_starflow.loading.weights import WeightsError
from mlx_starflow.models.t5 import T5Config, relative_position_buckets

CONFIGS = {
    # FLAN-T5 style, with d_kv * num_heads (32) != d_model (48).
    "gated-gelu": dict(d_model=48, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu"),
    # Original T5 style.
    "relu": dict(d_model=32, d_kv=16, num_heads=2, d_ff=48, num_layers=2, feed_forward_proj="relu"),
    # Few buckets and a short max distance, so a 40-token sequence uses the log buckets.
    "buckets": dict(
        d_model=32,
        d_kv=8,
        num_heads=2,
        d_ff=32,
        num_layers=3,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
    ),
}


def make_t5(folder, seed=0, **overrides):
    """A random T5ForConditionalGeneration saved as Hugging Face publishes it."""
    params = dict(CONFIGS["gated-gelu"], vocab_size=100, num_decoder_layers=1, dropout_rate=0.0)
    params.update(overrides)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(HFT5Config(**params)).eval()
    with torch.no_grad():  # larger norm weights than the init, so they matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def reference(model, ids, mask):
    with torch.no_grad():
        out = model.encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return (out.last_hidden_state * torch.tensor(mask)[..., None]).numpy()


def inputs(length=12, vocab=100, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (3, length))
    mask = np.ones_like(ids)
    mask[1, length - 3 :] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


def run(model, ids, mask):
    y = model(mx.array(ids), mx.array(mask)) * mx.array(mask)[..., None]
    return np.array(y.astype(mx.float32))


def rel_err(a, b):
    return np.abs(a - b).max() / max(1.0, np.abs(b).max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers(tmp_path, name):
    ref_model = make_t5(tmp_path, **CONFIGS[name])
    model = load_t5(tmp_path)
    assert model.config == T5Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    ids, mask = inputs(length=40 if name == "buckets" else 12)
    assert rel_err(run(model, ids, mask), reference(ref_model, ids, mask)) < 1e-5


def test_buckets_match_transformers():
    for buckets, distance in itertools.product([8, 32, 64], [12, 128]):
        rel = torch.arange(160)[None] - torch.arange(160)[:, None]
        want = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(160, buckets, distance), want)


def test_pytorch_bin(tmp_path):
    ref_model = make_t5(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
    ids, mask = inputs()
    assert rel_err(run(load_t5(tmp_path), ids, mask), reference(ref_model, ids, mask)) < 1e-5


def test_sharded_safetensors_skips_decoder_shard(tmp_path):
    ref_model = make_t5(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in ref_model.state_dict().items()}
    encoder = {k: v for k, v in state.items() if k.startswith("encoder.")}
    rest = {"shared.weight": state["shared.weight"]}
    decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
    save_file(encoder, tmp_path / "model-00001-of-00003.safetensors")
    save_file(rest, tmp_path / "model-00002-of-00003.safetensors")
    weight_map = {k: "model-00001-of-00003.safetensors" for k in encoder}
    weight_map.update({k: "model-00002-of-00003.safetensors" for k in rest})
    weight_map.update({k: "model-00003-of-00003.safetensors" for k in decoder})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # The decoder's shard is never written: loading must not need it.
    assert not any(k.startswith("decoder.") for k in read_weights(tmp_path))
    ids, mask = inputs()
    assert rel_err(run(load_t5(tmp_path), ids, mask), reference(ref_model, ids, mask)) < 1e-5


def test_strict_loading(tmp_path):
    ref_model = make_t5(tmp_path)
    state = {k: v.clone() for k, v in ref_model.state_dict().items()}
    extra = dict(state)
    extra["encoder.block.0.layer.1.DenseReluDense.wq.weight"] = torch.zeros(2)
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="encoder.block.0.layer.1.DenseReluDense.wq.weight"):
        load_t5(tmp_path)
    missing = {k: v for k, v in state.items() if k != "encoder.block.1.layer.0.SelfAttention.k.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="blocks.1.attention.k.weight"):
        load_t5(tmp_path)


def test_float16_refused_bfloat16_close(tmp_path):
    make_t5(tmp_path)
    with pytest.raises(ValueError, match="bfloat16"):
        load_t5(tmp_path, dtype=mx.float16)
    ids, mask = inputs()
    full = run(load_t5(tmp_path), ids, mask)
    half = load_t5(tmp_path, dtype=mx.bfloat16)
    assert half.shared.weight.dtype == mx.bfloat16
    assert rel_err(run(half, ids, mask), full) < 5e-2


def test_quantized(tmp_path):
    # d_model 64 is quantizable; the wo input (d_ff 96) is not a multiple of 64.
    make_t5(tmp_path, d_model=64, d_kv=16, num_heads=4, d_ff=96)
    ids, mask = inputs()
    full = run(load_t5(tmp_path), ids, mask)
    model = load_t5(tmp_path, quantize=8)
    block = model.blocks[0]
    assert isinstance(block.attention.q, nn.QuantizedLinear)
    assert isinstance(block.mlp.wi_0, nn.QuantizedLinear)
    assert isinstance(block.mlp.wo, nn.Linear) and not isinstance(block.mlp.wo, nn.QuantizedLinear)
    assert not isinstance(model.relative_bias, nn.QuantizedEmbedding)
    assert not isinstance(model.shared, nn.QuantizedEmbedding)  # linear layers only
    assert rel_err(run(model, ids, mask), full) < 3e-2
