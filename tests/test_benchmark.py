"""The benchmark command on the tiny architecture, the random 3B model's spec against
the released checkpoint's keys, quantized folders, and the token loop's options.
No timing is asserted: timings belong to BENCHMARKS.md."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_starflow import benchmark
from mlx_starflow.config import starflow_config_from_args
from mlx_starflow.flow import Flow, FlowBlock
from mlx_starflow.quant import QuantizedLinear, quant_args, quantize_linear
from mlx_starflow.t5 import T5Config, T5Encoder
from mlx_starflow.weights import IGNORED, load_flow, save_model

KEYS = Path(__file__).resolve().parents[2] / "shared" / "starflow_3B_t2i_keys.tsv"


def released_shapes():
    shapes = {}
    for line in KEYS.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if not IGNORED.search(name):
            shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.mark.skipif(not KEYS.exists(), reason="needs ../shared/starflow_3B_t2i_keys.tsv")
def test_random_3b_matches_the_released_checkpoint():
    spec = benchmark.flow_spec("3b")  # lazy: nothing is allocated
    assert spec == released_shapes()
    assert sum(int(np.prod(s)) for s in spec.values()) == 3_858_281_544


def test_command_on_tiny(tmp_path):
    out = tmp_path / "r.json"
    assert benchmark.main(["--arch", "tiny", "--dtype", "float32", "--repeats", "1", "--tokens", "2",
                           "--compare-loop", "--precision", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["stages"]) == set(benchmark.STAGES)
    deep = r["stages"]["deep"]
    assert deep["tokens_timed"] == 2 and deep["weight_bytes_per_token"] > 0
    assert deep["kv_cache_bytes"] > 0 and deep["peak_memory"] >= deep["kv_cache_bytes"]
    assert r["limits"]["copy_GBps"] > 0 and r["limits"]["matmul_peak_GFLOPs"] > 0
    # float32 on the CPU: the linears are held input-major, and the limits measured so
    n_linears = 4 * sum(int(n) for n in benchmark.ARCHS["tiny"]["flow"]["layers_per_block"].split())
    assert r["stages"]["load"]["input_major_linears"] == n_linears and r["limits"]["in_out"]
    assert len(r["loop"]) == 4
    assert set(r["precision"]["flow"]) == {"bfloat16", "float16", "8-bit", "4-bit", "8-bit, fp32 scales",
                                                "4-bit, fp32 scales"}
    assert all(np.isfinite(v["sample"]) for v in r["precision"]["flow"].values())
    assert r["machine"]["versions"]["mlx"]


def test_command_quantized_jacobi(tmp_path):
    out = tmp_path / "r.json"
    assert benchmark.main(["--arch", "tiny", "--dtype", "bfloat16", "--quantize", "4", "--sampler", "jacobi",
                           "--cfg", "0", "--repeats", "1", "--tokens", "4", "--text-quantize", "8",
                           "--stages", "text,deep,shallow", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["args"]["quantize"] == 4 and "denoise" not in r["stages"]
    assert "input_major_linears" not in r["stages"]["load"] and not r["limits"]["in_out"]


def test_random_flow_is_built_in_the_target_precision():
    cfg = benchmark.flow_config("tiny")
    model, skipped = benchmark.random_flow(cfg, mx.bfloat16, {"bits": 4, "group_size": 64})
    assert skipped == []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):  # only the transformer linears are quantized
            assert isinstance(m, nn.QuantizedLinear) == (".attn_blocks." in f".{path}"), path
    floats = [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    assert all(v.dtype == mx.bfloat16 for v in floats)
    assert cfg.quantization == {"bits": 4, "group_size": 64}


def test_layers_that_do_not_fit_the_group_are_listed():
    args = {**benchmark.ARCHS["tiny"]["flow"], "channels": 192}
    cfg = starflow_config_from_args(args, txt_dim=64)
    model, skipped = benchmark.random_flow(cfg, mx.float32, {"bits": 8, "group_size": 128})
    # 192 wide inputs do not split into groups of 128; the MLP's 768 wide input does.
    assert "blocks.2.attn_blocks.0.attention.qkv" in skipped
    assert "blocks.2.attn_blocks.0.mlp.main.2" not in skipped
    assert isinstance(model.blocks[2].attn_blocks[0].mlp.main[2], QuantizedLinear)
    assert not isinstance(model.blocks[2].attn_blocks[0].attention.qkv, nn.QuantizedLinear)


def test_quantized_folder_round_trip(tmp_path):
    cfg = benchmark.flow_config("tiny")
    model, _ = benchmark.random_flow(cfg, mx.float32, {"bits": 8, "group_size": 64})
    save_model(tmp_path / "q", cfg, dict(tree_flatten(model.parameters())))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"bits": 8, "group_size": 64}
    # Asking for 4 bits at load time does not re-quantize an 8-bit folder.
    loaded = load_flow(tmp_path / "q", quantize={"bits": 4, "group_size": 64})
    qkv = loaded.blocks[-1].attn_blocks[0].attention.qkv
    assert isinstance(qkv, QuantizedLinear) and qkv.bits == 8
    x = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    y = mx.random.normal((1, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
    np.testing.assert_array_equal(np.array(model(x, y)[0]), np.array(loaded(x, y)[0]))


@pytest.mark.parametrize("overlap,compiled", [(True, False), (False, True), (True, True)])
def test_token_loop_options_give_the_same_samples(overlap, compiled):
    cfg = benchmark.flow_config("tiny")  # 64 tokens: long enough to be compiled
    model, _ = benchmark.random_flow(cfg, mx.float32)
    noise = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    y = mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
    default = (FlowBlock.overlap, FlowBlock.compile_step)
    try:
        FlowBlock.overlap, FlowBlock.compile_step = False, False
        ref = model.sample(noise, y, guidance=2.0)
        FlowBlock.overlap, FlowBlock.compile_step = overlap, compiled
        seen = []
        out = model.sample(noise, y, guidance=2.0, progress=lambda i, done, total: seen.append((i, done)))
    finally:
        FlowBlock.overlap, FlowBlock.compile_step = default
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-4, atol=1e-4)
    assert [d for i, d in seen if i == 2] == list(range(1, 65))  # every token reported once, in order


def test_t5_quantization_options():
    model = T5Encoder(T5Config(vocab_size=50, d_model=96, d_kv=16, num_heads=2, d_ff=128, num_layers=1,
                               feed_forward_proj="gated-gelu"))
    assert quant_args(4) == {"bits": 4, "group_size": 64}
    assert quant_args({"bits": 8, "group_size": 32}) == {"bits": 8, "group_size": 32}
    with pytest.raises(ValueError):
        quant_args(3)
    skipped = quantize_linear(model, bits=4, group_size=64)
    # 96 wide inputs do not fit groups of 64; the 128 wide input of wo does.
    assert "blocks.0.attention.q" in skipped and "blocks.0.mlp.wo" not in skipped
    assert isinstance(model.blocks[0].mlp.wo, nn.QuantizedLinear)


def test_loading_warns_about_layers_left_unquantized(tmp_path):
    args = {**benchmark.ARCHS["tiny"]["flow"], "channels": 192}
    cfg = starflow_config_from_args(args, txt_dim=64)
    model, _ = benchmark.random_flow(cfg, mx.float32)
    save_model(tmp_path / "f", cfg, dict(tree_flatten(model.parameters())))
    with pytest.warns(UserWarning, match="left unquantized.*attention.qkv"):
        load_flow(tmp_path / "f", quantize={"bits": 8, "group_size": 128})


def test_command_with_a_converted_folder(tmp_path):
    cfg = benchmark.flow_config("tiny")
    model, _ = benchmark.random_flow(cfg, mx.float32)
    save_model(tmp_path / "f", cfg, dict(tree_flatten(model.parameters())))
    out = tmp_path / "r.json"
    assert benchmark.main(["--model", str(tmp_path / "f"), "--quantize", "8", "--repeats", "1", "--tokens", "2",
                           "--stages", "prefill,deep", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    float32_bytes = 4 * sum(int(np.prod(s)) for s in benchmark.flow_spec("tiny").values())
    assert r["stages"]["load"]["weight_bytes"] < float32_bytes / 2  # quantized on the fly
    assert r["stages"]["deep"]["extrapolated"] == pytest.approx(64 * r["stages"]["deep"]["per_token"])


def test_warmup_runs_and_bad_counts(tmp_path, monkeypatch):
    calls = []
    denoise = Flow.denoise
    monkeypatch.setattr(Flow, "denoise", lambda self, *a, **k: calls.append(1) or denoise(self, *a, **k))
    out = tmp_path / "r.json"
    for warmup in (0, 2):
        calls.clear()
        assert benchmark.main(["--arch", "tiny", "--dtype", "float32", "--stages", "denoise", "--repeats", "1",
                               "--warmup", str(warmup), "--json", str(out)]) == 0
        assert len(calls) == 1 + warmup  # a slow stage can be measured once
        assert json.loads(out.read_text())["stages"]["denoise"]["time"]["n"] == 1
    for bad in (["--repeats", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit) as e:
            benchmark.main(["--arch", "tiny", *bad])
        assert e.value.code == 2
