"""The `use_pretrained_lm` layout: a deep block that is a Gemma-architecture LM."""

import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import T2I_ARGS, rand, randomize, save_reference
from mlx.utils import tree_flatten
from mlx_lm.models import gemma2, gemma3_text

from mlx_starflow.loading.weights import (
    WeightsError,
    convert_starflow,
    init_from_lm,
    lm_flow_config,
    load_flow,
    read_config,
    save_model,
)
from mlx_starflow.models.config import LM_LAYOUTS, ConfigError, lm_sizes_from_shapes, starflow_config_from_args
from mlx_starflow.models.flow import Flow, LMBlock
from mlx_starflow.models.rope import rope_table_1d
from mlx_starflow.sample import Jacobi, invert, sample

B = 2
# Tiny deep-block sizes: width 48 (the text width), 4 heads of 16 over 2 KV heads, MLP 80.
SIZES = dict(layers=2, channels=48, heads=4, kv_heads=2, head_dim=16, mlp_dim=80)
LAYOUT_ARGS = {
    "gemma3_1b": {},
    "gemma2_2b_mm_r2l_text_everywhere": {
        "use_pretrained_lm": "gemma2_2b",
        "use_mm_attn": 1,
        "seq_order": "R2L",
        "cond_top_only": 0,
        # Without QK-norm the weights give heads x head size only: the YAML's head size
        # then names the deep block's too (as in the reference's tiny fixtures).
        "head_dim": 16,
    },
    "gemma3_4b": {"use_pretrained_lm": "gemma3_4b"},
}


def lm_args(name):
    return {**T2I_ARGS, "use_pretrained_lm": "gemma3_1b", **LAYOUT_ARGS[name]}


def lm_flow(name, seed=0):
    # Random weights of scale 0.1: at 0.2 the sequential maps of these narrow blocks amplify
    # float32 rounding past the tolerances (sampling is then ill-conditioned, not wrong).
    return randomize(Flow(starflow_config_from_args(lm_args(name), lm=SIZES)), seed, scale=0.1)


def text(flow, rows, seed=2):
    return rand((rows, flow.config.txt_size, flow.config.txt_dim), seed)


def test_yaml_names_the_layout_and_the_weights_give_the_sizes():
    cfg = starflow_config_from_args(lm_args("gemma3_1b"))  # no weights yet: the released sizes
    assert (cfg.top_channels, cfg.layers_per_block[-1], cfg.top_head_size) == (1152, 26, 256)
    assert (cfg.top_num_heads, cfg.top_num_kv_heads, cfg.top_mlp_dim, cfg.txt_dim) == (4, 1, 6912, 1152)
    assert cfg.text_encoder == "gemma3_1b" and cfg.layers_per_block[:-1] == [1, 0, 1]
    flow = lm_flow("gemma3_1b")
    shapes = {k: v.shape for k, v in tree_flatten(flow.parameters())}
    assert lm_sizes_from_shapes(shapes, "blocks.3.", "gemma3_1b", 24) == SIZES
    # Without QK-norm the head size is the layout's (256) where it divides, else the YAML's.
    gemma2 = lm_flow("gemma2_2b_mm_r2l_text_everywhere")
    shapes = {k: v.shape for k, v in tree_flatten(gemma2.parameters())}
    assert lm_sizes_from_shapes(shapes, "blocks.3.", "gemma2_2b", 16) == SIZES
    with pytest.raises(ConfigError, match="cannot split"):  # neither 256 nor the YAML's 24 fits 64/32
        lm_sizes_from_shapes(shapes, "blocks.3.", "gemma2_2b", 24)
    with pytest.raises(ConfigError, match="unknown use_pretrained_lm layout"):
        starflow_config_from_args({**T2I_ARGS, "use_pretrained_lm": "gemma9"})


def test_deep_block_structure():
    flow = lm_flow("gemma3_1b")
    deep = flow.blocks[-1]
    assert isinstance(deep, LMBlock) and "proj_txt" not in deep and "final_norm" in deep
    names = {k for k, _ in tree_flatten(deep.parameters())}
    assert "attn_blocks.1.attention.query_norm.weight" in names
    assert not any(k.endswith(".bias") for k in names if k.startswith("attn_blocks"))
    assert deep.attn_blocks[0].attention.qkv.weight.shape == (16 * (4 + 2 * 2), 48)
    assert deep.attn_blocks[0].mlp.gate_proj.weight.shape == (80, 48)
    # The shallow blocks keep the YAML's structure (LayerNorm, GELU MLP, biases).
    assert "main" in flow.blocks[0].attn_blocks[0].mlp and "bias" in flow.blocks[0].attn_blocks[0].attention.qkv
    gemma2 = lm_flow("gemma2_2b_mm_r2l_text_everywhere").blocks[-1]
    assert "query_norm" not in gemma2.attn_blocks[0].attention
    assert LM_LAYOUTS["gemma3_4b"]["qk_norm"] and not LM_LAYOUTS["gemma2_2b"]["qk_norm"]


def test_rope_is_rotate_half_1d():
    """The LM block's rotation pairs x[i] with x[i + hd/2] at angle pos * 10000^(-2i/hd)."""
    cos, sin = rope_table_1d(8, 5)
    q = rand((1, 1, 5, 8), 3)
    got = np.array(lm_flow("gemma3_1b").blocks[-1].attn_blocks[0].attention.rotate(q, cos, sin))
    qn = np.array(q)[0, 0]
    f = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    want = np.empty_like(qn)
    for t in range(5):
        a = t * f
        want[t, :4] = qn[t, :4] * np.cos(a) - qn[t, 4:] * np.sin(a)
        want[t, 4:] = qn[t, 4:] * np.cos(a) + qn[t, :4] * np.sin(a)
    np.testing.assert_allclose(got[0, 0], want, atol=1e-5)


@pytest.mark.parametrize("name", list(LAYOUT_ARGS))
def test_sequential_equals_jacobi_to_convergence_with_guidance(name):
    flow = lm_flow(name)
    cfg = flow.config
    noise = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), 4)
    y = text(flow, 2 * B)
    seq = sample(flow, noise, y, guidance=2.0)
    jac = sample(flow, noise, y, guidance=2.0, jacobi=Jacobi(block_size=8, threshold=1e-12, max_iter=200))
    assert np.all(np.isfinite(np.array(seq)))
    np.testing.assert_allclose(np.array(jac), np.array(seq), atol=1e-4)


@pytest.mark.parametrize("name", list(LAYOUT_ARGS))
def test_density_inverts_sampling(name):
    flow = lm_flow(name)
    cfg = flow.config
    x = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), 5)
    y = text(flow, B)
    z, logdet = flow(x, y)
    np.testing.assert_allclose(np.array(sample(flow, z, y)), np.array(x), atol=2e-4)
    # Guided: invert is the exact inverse of guided sampling.
    y2 = text(flow, 2 * B, seed=6)
    zg = invert(flow, x, y2, guidance=1.5)
    np.testing.assert_allclose(np.array(sample(flow, zg, y2, guidance=1.5)), np.array(x), atol=2e-4)
    # The log-determinant is the deep block's own plus the shallow blocks'.
    assert np.all(np.isfinite(np.array(logdet)))


@pytest.mark.parametrize("name", list(LAYOUT_ARGS))
def test_score_step_is_the_gradient_through_the_lm_block(name):
    # The LM block's own 1-D rotary table in the layer-by-layer backward pass, chunked.
    flow = lm_flow(name)
    cfg = flow.config
    x = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), 5)
    y = text(flow, B)
    want = x + 0.09 * mx.grad(lambda v: flow.log_prob(v, y).sum())(x)
    got = flow.denoise(x, y, 0.3, rows=7)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=2e-6 * float(mx.abs(want).max()))


def test_text_changes_the_deep_block_only_through_its_prefix():
    flow = lm_flow("gemma3_1b")
    cfg = flow.config
    x = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), 7)
    z1, _ = flow(x, text(flow, B, 8))
    z2, _ = flow(x, text(flow, B, 9))
    assert float(mx.abs(z1 - z2).max()) > 1e-3


@pytest.mark.parametrize("name", list(LAYOUT_ARGS))
def test_convert_from_pth_and_yaml_then_folder_round_trip(name, tmp_path):
    flow = lm_flow(name)
    args = {**lm_args(name), "layers_per_block": "1 0 1 7"}  # the deep count in the YAML is not used
    ckpt, yml = save_reference(flow, args, tmp_path)
    out = convert_starflow(ckpt, yml, tmp_path / "converted")
    loaded = load_flow(out)
    cfg = loaded.config
    assert (cfg.pretrained_lm, cfg.layers_per_block[-1], cfg.top_head_size) == (
        args["use_pretrained_lm"],
        2,
        16,
    )
    assert read_config(out) == cfg
    x = rand((B, cfg.input_size, cfg.input_size, cfg.in_channels), 10)
    y = text(flow, B)
    z0, l0 = flow(x, y)
    z1, l1 = loaded(x, y)
    np.testing.assert_allclose(np.array(z1), np.array(z0), atol=1e-6)
    np.testing.assert_allclose(np.array(l1), np.array(l0), atol=1e-5)
    # Our folder format, written again and read back: the same model.
    again = load_flow(save_model(tmp_path / "again", cfg, dict(tree_flatten(loaded.parameters()))))
    np.testing.assert_allclose(np.array(again(x, y)[0]), np.array(z0), atol=1e-6)


def _gemma3_lm(folder, layers=2, seed=0):
    """A tiny random Gemma 3 text model saved as mlx-lm saves one; one RoPE base and no
    window in reach, so its layers compute what the flow's deep block computes."""
    args = dict(
        model_type="gemma3_text",
        hidden_size=48,
        num_hidden_layers=layers,
        intermediate_size=80,
        num_attention_heads=4,
        head_dim=16,
        num_key_value_heads=2,
        vocab_size=64,
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16,
        sliding_window=4096,
    )
    mx.random.seed(seed)
    model = gemma3_text.Model(gemma3_text.ModelArgs(**args))
    randomize(model, seed)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(args))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return model


def test_init_deep_block_from_an_mlx_lm_gemma3_folder(tmp_path):
    lm = _gemma3_lm(tmp_path / "lm")
    cfg = lm_flow_config(lm_args("gemma3_1b"), tmp_path / "lm")
    assert (cfg.top_channels, cfg.top_num_heads, cfg.top_num_kv_heads, cfg.top_head_size, cfg.top_mlp_dim) == (
        48,
        4,
        2,
        16,
        80,
    )
    flow = randomize(Flow(cfg), seed=3)
    proj_in = np.array(flow.blocks[-1].proj_in.weight)
    init_from_lm(flow, tmp_path / "lm")
    deep = flow.blocks[-1]
    np.testing.assert_array_equal(np.array(deep.proj_in.weight), proj_in)  # the flow's own: untouched
    np.testing.assert_array_equal(np.array(deep.final_norm.weight), np.array(lm.model.norm.weight))
    # Each deep layer computes the LM's layer (1-D RoPE from position 0, causal).
    h = rand((B, 9, 48), 11)
    rope = rope_table_1d(16, 9)
    for ours, theirs in zip(deep.attn_blocks, lm.model.layers):
        np.testing.assert_allclose(np.array(ours(h, rope)), np.array(theirs(h, mask="causal")), atol=2e-5)
    # The flow then samples and inverts as any other.
    x = rand((1, cfg.input_size, cfg.input_size, cfg.in_channels), 12)
    y = rand((1, cfg.txt_size, 48), 13)
    z, _ = flow(x, y)
    np.testing.assert_allclose(np.array(sample(flow, z, y)), np.array(x), atol=2e-4)


def test_init_from_lm_is_strict(tmp_path):
    _gemma3_lm(tmp_path / "lm", layers=3)
    cfg = starflow_config_from_args(lm_args("gemma3_1b"), lm=SIZES)  # 2 deep layers
    with pytest.raises(WeightsError, match="does not use"):
        init_from_lm(Flow(cfg), tmp_path / "lm")


def test_init_from_an_mlx_lm_gemma2_folder(tmp_path):
    args = dict(
        model_type="gemma2",
        hidden_size=48,
        num_hidden_layers=2,
        intermediate_size=80,
        num_attention_heads=4,
        head_dim=16,
        rms_norm_eps=1e-6,
        vocab_size=64,
        num_key_value_heads=2,
    )
    lm = randomize(gemma2.Model(gemma2.ModelArgs(**args)), 1)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps(args))
    mx.save_safetensors(str(tmp_path / "lm" / "model.safetensors"), dict(tree_flatten(lm.parameters())))
    cfg = lm_flow_config(lm_args("gemma2_2b_mm_r2l_text_everywhere"), tmp_path / "lm")
    flow = init_from_lm(Flow(cfg), tmp_path / "lm")
    ours, theirs = flow.blocks[-1].attn_blocks[1], lm.model.layers[1]
    a = theirs.self_attn
    qkv = np.concatenate([np.array(a.q_proj.weight), np.array(a.k_proj.weight), np.array(a.v_proj.weight)])
    np.testing.assert_array_equal(np.array(ours.attention.qkv.weight), qkv)
    np.testing.assert_array_equal(
        np.array(ours.mlp.post_norm.weight), np.array(theirs.post_feedforward_layernorm.weight)
    )
    np.testing.assert_array_equal(np.array(ours.mlp.norm.weight), np.array(theirs.pre_feedforward_layernorm.weight))


def test_pipeline_parallel_refuses_a_language_model_deep_block():
    from mlx_starflow.distributed import rank_bytes

    cfg = starflow_config_from_args(lm_args("gemma3_1b"), lm=SIZES)
    with pytest.raises(ValueError, match="pipeline parallel does not split a gemma3_1b deep block"):
        rank_bytes(cfg, 2)
