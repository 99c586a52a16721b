"""The benchmark command on the tiny architecture, the random 3B model's spec against
the released checkpoint's keys, the random builders, the machine probes' advice,
and the token loop's options. No timing is asserted: timings belong to BENCHMARKS.md."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_starflow.cli import benchmark, common
from mlx_starflow.loading import device
from mlx_starflow.loading.quant import quant_args, quantize_linear
from mlx_starflow.loading.weights import IGNORED, load_flow, save_model
from mlx_starflow.models.config import starflow_config_from_args
from mlx_starflow.models.flow import Flow
from mlx_starflow.models.t5 import T5Config, T5Encoder
from mlx_starflow.sample import Jacobi, sample, sample_steps
from mlx_starflow.tools import benchmark as stages
from mlx_starflow.tools import machine, random_models
from mlx_starflow.tools.benchmark import time_block_ends

KEYS = Path(__file__).resolve().parents[2] / "shared" / "starflow_3B_t2i_keys.tsv"
TINY = ["--arch", "tiny", "--repeats", "1"]


def released_shapes():
    shapes = {}
    for line in KEYS.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if not IGNORED.search(name):
            shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.mark.skipif(not KEYS.exists(), reason="needs ../shared/starflow_3B_t2i_keys.tsv")
def test_random_3b_matches_the_released_checkpoint():
    spec = random_models.flow_spec("3b")  # lazy: nothing is allocated
    assert spec == released_shapes()
    assert sum(int(np.prod(s)) for s in spec.values()) == 3_858_281_544


def test_command_on_tiny(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert (
        benchmark.main(
            [*TINY, "--dtype", "float32", "--tokens", "2", "--compare-loop", "--compare-precisions", "--json", str(out)]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert set(r["stages"]) == set(benchmark.STAGES)
    deep = r["stages"]["deep"]
    assert deep["tokens_timed"] == 2 and deep["extrapolated"] and deep["weight_bytes_per_token"] > 0
    assert deep["block_seconds"] == pytest.approx(64 * deep["per_token"])
    assert r["stages"]["prefill"]["kv_cache_bytes"] > 0
    assert deep["peak_memory"] >= deep["kv_cache_bytes"] + r["stages"]["load"]["weight_bytes"]
    # The text encoder is built beside the resident flow, as the pipeline loads it.
    enc = r["stages"]["text"]
    assert enc["peak_memory"] > r["stages"]["load"]["weight_bytes"] + enc["weight_bytes"]
    lim = r["limits"]
    assert lim["copy_GBps"] > 0 and lim["layer_many_GFLOPs"] > 0 and lim["layer_step_rows"] == 2
    # float32 on the CPU: held input-major (device.prepare), and the layer probe likewise
    assert r["stages"]["load"]["input_major"] and lim["input_major"]
    assert len(r["loop"]) == 4
    assert set(r["precision"]["flow"]) == {
        "bfloat16",
        "float16",
        "8-bit",
        "4-bit",
        "8-bit, fp32 scales",
        "4-bit, fp32 scales",
    }
    assert all(np.isfinite(v["sample"]) for v in r["precision"]["flow"].values())
    assert r["machine"]["versions"]["mlx"]
    img = r["image"]
    assert img["extrapolated"] == ["deep", "shallow"] and not img["missing"] and not img["estimated"]
    assert img["seconds"] == pytest.approx(sum(img["parts"].values()))
    assert img["peak_memory"] == max(r["stages"][k]["peak_memory"] for k in benchmark.STAGES if k != "load")
    text = capsys.readouterr().out
    # Progress per stage, then a sentence to quote, then the details in words.
    assert "[1/7] building the flow" in text and "[7/7] denoising" in text
    assert "summary: one 64x64 image with guidance 3.6: about " in text
    assert "% of the memory copy speed" in text and "details (median of 1 runs" in text
    # The plan comes before the first long stage (the text encoding), text prefix included,
    # made from tokens timed after a warm-up token.
    plan = text.index("plan, from tokens timed after a warm-up")
    assert text.index("[1/7] building the flow") < plan < text.index("[2/7] encoding")
    assert "text prefix: about" in text[plan:] and "per token after a warm-up token" in text[plan:]
    p = r["plan"]
    assert p["deep"]["estimate"] == pytest.approx(64 * p["deep_token"])
    assert p["prefill"]["estimate"] > 0 and p["text"]["estimate"] > 0
    # The whole command's peak, as the command runs it and as an app does, beside the stages'.
    assert img["peak_resident"] == img["peak_memory"]
    assert 0 < img["peak_one_shot"] < img["peak_resident"]
    assert img["whole_peak_stages"] == sorted(k for k in benchmark.STAGES if k != "load")
    summary = next(line for line in text.splitlines() if line.startswith("summary:"))
    assert "peak of generate" in summary and "(one-shot" in summary and "(resident)" in summary
    assert "left out: loading the weights" in text and "generate, one-shot" in text


def test_command_quantized_jacobi(tmp_path):
    out = tmp_path / "r.json"
    assert (
        benchmark.main(
            [
                *TINY,
                "--dtype",
                "bfloat16",
                "--quantize",
                "4",
                "--sampler",
                "jacobi",
                "--cfg",
                "0",
                "--tokens",
                "4",
                "--text-quantize",
                "8",
                "--stages",
                "text,deep,shallow",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["args"]["quantize"] == 4 and "denoise" not in r["stages"]
    assert r["image"]["missing"] == ["prefill", "denoise", "vae"]
    assert not r["stages"]["load"]["input_major"] and not r["limits"]["input_major"]
    assert r["limits"]["layer_step_rows"] == 1  # no guidance: one row per image
    # the logical parameters of the architecture, not the packed 4-bit words
    assert r["stages"]["load"]["parameters"] == sum(int(np.prod(s)) for s in random_models.flow_spec("tiny").values())


@pytest.mark.parametrize("bits", [4, 8])
def test_parameter_count_unpacks_quantized_layers(bits):
    cfg = random_models.flow_config("tiny")
    plain, _ = random_models.random_flow(cfg, mx.float32)
    quantized, skipped = random_models.random_flow(cfg, mx.float32, {"bits": bits, "group_size": 64})
    assert not skipped and any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules())
    expected = sum(v.size for _, v in tree_flatten(plain.parameters()))
    assert stages.parameter_count(plain) == expected
    assert stages.parameter_count(quantized) == expected


def test_auto_extrapolates_long_blocks_and_estimates_long_denoising(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stages, "AUTO_BLOCK", 0.0)  # every block "takes too long"
    monkeypatch.setattr(stages, "AUTO_DENOISE", 0.0)
    out = tmp_path / "r.json"
    assert benchmark.main([*TINY, "--dtype", "float32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["stages"]["deep"]["extrapolated"] and r["stages"]["deep"]["tokens_timed"] == benchmark.AUTO_TOKENS
    d = r["stages"]["denoise"]
    assert d["estimated_seconds"] > 0 and "time" not in d and d["probed"]
    # the probe reached the step's peak: its memory is in the whole command's
    assert d["peak_memory"] > 0 and "denoise" in r["image"]["whole_peak_stages"]
    assert r["image"]["estimated"] == ["denoise"]
    text = capsys.readouterr().out
    assert "timing 4 tokens at each end and extrapolating (--tokens all runs it whole)" in text
    assert "denoising run up to the deep block's top layer's backward pass (the step's peak)" in text

    monkeypatch.setattr(stages, "AUTO_BLOCK", 1e9)
    assert benchmark.main([*TINY, "--dtype", "float32", "--stages", "deep", "--json", str(out)]) == 0
    deep = json.loads(out.read_text())["stages"]["deep"]
    assert not deep["extrapolated"] and deep["tokens_timed"] == 64


@pytest.mark.parametrize("quantize", [None, 4])
def test_the_denoising_probe_reaches_the_whole_steps_peak(quantize):
    # The benchmark's stated method for a long score step: stopped after the deep block's
    # top layer's backward pass, its peak is the whole step's.
    cfg = random_models.flow_config("small")
    model, _ = random_models.random_flow(cfg, mx.bfloat16, quantize and {"bits": quantize, "group_size": 64})
    device.prepare(model)
    side = cfg.grid_size
    x = mx.random.normal((1, side, side, cfg.in_channels), key=mx.random.key(5))
    y = 0.1 * mx.random.normal((1, cfg.txt_size, cfg.txt_dim), key=mx.random.key(6))
    mx.eval(x, y)
    # The CPU backend frees buffers asynchronously, so a run's peak is one of a few values a buffer
    # apart (measured 15.5, 16.1 and 17.1 MB for either): the probe's peaks must meet the step's.
    peaks = []
    for run in (lambda: mx.eval(model.denoise(x, y)), lambda: stages.denoise_probe(model, x, y)):
        seen = []
        for _ in range(3):
            mx.clear_cache()
            mx.reset_peak_memory()
            run()
            seen.append(mx.get_peak_memory())
        peaks.append(seen)
    (whole, probe) = peaks
    assert min(probe) <= 1.02 * max(whole) and min(whole) <= 1.02 * max(probe), peaks


def test_help_names_the_module_and_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m mlx_starflow.benchmark")
    assert "(default: 3b)" in text and "(default: 3.6)" in text and "(default: sequential)" in text
    assert "random weights cannot tell it" in text  # why the sampler differs from generate's


def test_slow_blas_advice_gives_the_install_step_and_the_path(monkeypatch):
    monkeypatch.setattr(machine.sys, "platform", "linux")
    advice = machine.blas_advice()
    assert "sudo apt install libopenblas0-pthread" in advice
    assert f"LD_PRELOAD={machine.openblas_path()} python -m mlx_starflow.generate" in advice
    assert machine.openblas_path("aarch64") == "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"
    assert machine.openblas_path("x86_64") == "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def test_random_flow_is_built_in_the_target_precision():
    cfg = random_models.flow_config("tiny")
    model, skipped = random_models.random_flow(cfg, mx.bfloat16, {"bits": 4, "group_size": 64})
    assert skipped == []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear):  # only the transformer linears are quantized
            assert isinstance(m, nn.QuantizedLinear) == (".attn_blocks." in f".{path}"), path
    floats = [v for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    assert all(v.dtype == mx.bfloat16 for v in floats)
    assert cfg.quantization == {"bits": 4, "group_size": 64}
    # Same seed, same weights; another seed, others.
    again, _ = random_models.random_flow(random_models.flow_config("tiny"), mx.bfloat16, {"bits": 4, "group_size": 64})
    other, _ = random_models.random_flow(
        random_models.flow_config("tiny"), mx.bfloat16, {"bits": 4, "group_size": 64}, seed=1
    )
    w = [np.array(m.blocks[-1].proj_in.weight.astype(mx.float32)) for m in (model, again, other)]
    np.testing.assert_array_equal(w[0], w[1])
    assert not np.array_equal(w[0], w[2])


def test_random_flow_never_holds_the_wider_precision():
    cfg = random_models.flow_config("small")
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model, _ = random_models.random_flow(cfg, mx.float32, {"bits": 4, "group_size": 64})
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    float32 = 4 * sum(int(np.prod(s)) for s in random_models.flow_spec("small").values())
    assert size < float32 / 3
    assert mx.get_peak_memory() - before < float32 / 2  # one layer at a time in float32


def test_layers_that_do_not_fit_the_group_are_listed():
    args = {**random_models.ARCHS["tiny"]["flow"], "channels": 192}
    cfg = starflow_config_from_args(args, txt_dim=64)
    model, skipped = random_models.random_flow(cfg, mx.float32, {"bits": 8, "group_size": 128})
    # 192 wide inputs do not split into groups of 128; the MLP's 768 wide input does.
    assert "blocks.2.attn_blocks.0.attention.qkv" in skipped
    assert "blocks.2.attn_blocks.0.mlp.main.2" not in skipped
    assert isinstance(model.blocks[2].attn_blocks[0].mlp.main[2], nn.QuantizedLinear)
    assert not isinstance(model.blocks[2].attn_blocks[0].attention.qkv, nn.QuantizedLinear)


def test_quantized_random_flow_round_trips_through_a_folder(tmp_path):
    cfg = random_models.flow_config("tiny")
    model, _ = random_models.random_flow(cfg, mx.float32, {"bits": 8, "group_size": 64})
    save_model(tmp_path / "q", cfg, dict(tree_flatten(model.parameters())))
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"bits": 8, "group_size": 64}
    loaded = load_flow(tmp_path / "q")
    x = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    y = mx.random.normal((1, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
    np.testing.assert_array_equal(np.array(model(x, y)[0]), np.array(loaded(x, y)[0]))


@pytest.mark.parametrize("overlap,compiled", [(True, False), (False, True), (True, True)])
def test_token_loop_options_give_the_same_samples(overlap, compiled):
    cfg = random_models.flow_config("tiny")  # 64 tokens: long enough to be compiled
    model, _ = random_models.random_flow(cfg, mx.float32)
    noise = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    y = mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
    ref = sample(model, noise, y, 2.0, overlap=False, compile_step=False)
    steps = list(sample_steps(model, noise, y, 2.0, overlap=overlap, compile_step=compiled))
    np.testing.assert_allclose(np.array(steps[-1].x), np.array(ref), rtol=1e-4, atol=1e-4)
    assert [s.done for s in steps if s.block == 2] == list(range(1, 65))  # every token reported once, in order


def test_jacobi_timing_counts_whole_chunks():
    cfg = random_models.flow_config("tiny")
    model, _ = random_models.random_flow(cfg, mx.float32)
    block = model.blocks[0]
    z = mx.random.normal((1, 64, cfg.token_dim), key=mx.random.key(3))
    caches = block.new_caches(1, 64)
    r = time_block_ends(block, z, caches, 0, 5, 1, model.rope(False, 8, 8, 0), jacobi=Jacobi(block_size=4))
    assert r["tokens_timed"] == 8  # 5 tokens round up to two chunks of 4, after one untimed chunk
    assert r["per_token"] > 0 and r["block_seconds"] == pytest.approx(64 * r["per_token"])


def test_t5_quantization_options():
    model = T5Encoder(
        T5Config(
            vocab_size=50, d_model=96, d_kv=16, num_heads=2, d_ff=128, num_layers=1, feed_forward_proj="gated-gelu"
        )
    )
    assert quant_args(4) == {"bits": 4, "group_size": 64}
    assert quant_args({"bits": 8, "group_size": 32}) == {"bits": 8, "group_size": 32}
    with pytest.raises(ValueError):
        quant_args(3)
    skipped = quantize_linear(model, bits=4, group_size=64)
    # 96 wide inputs do not fit groups of 64; the 128 wide input of wo does.
    assert "blocks.0.attention.q" in skipped and "blocks.0.mlp.wo" not in skipped
    assert isinstance(model.blocks[0].mlp.wo, nn.QuantizedLinear)


def test_loading_warns_about_layers_left_unquantized(tmp_path):
    args = {**random_models.ARCHS["tiny"]["flow"], "channels": 192}
    cfg = starflow_config_from_args(args, txt_dim=64)
    model, _ = random_models.random_flow(cfg, mx.float32)
    save_model(tmp_path / "f", cfg, dict(tree_flatten(model.parameters())))
    with pytest.warns(UserWarning, match="left unquantized.*attention.qkv"):
        load_flow(tmp_path / "f", quantize={"bits": 8, "group_size": 128})


def test_command_with_a_converted_folder(tmp_path):
    cfg = random_models.flow_config("tiny")
    model, _ = random_models.random_flow(cfg, mx.float32)
    save_model(tmp_path / "f", cfg, dict(tree_flatten(model.parameters())))
    out = tmp_path / "r.json"
    assert (
        benchmark.main(
            [
                "--model",
                str(tmp_path / "f"),
                "--quantize",
                "8",
                "--repeats",
                "1",
                "--tokens",
                "2",
                "--stages",
                "prefill,deep",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    float32_bytes = 4 * sum(int(np.prod(s)) for s in random_models.flow_spec("tiny").values())
    assert r["stages"]["load"]["weight_bytes"] < float32_bytes / 2  # quantized on the fly
    assert r["stages"]["deep"]["block_seconds"] == pytest.approx(64 * r["stages"]["deep"]["per_token"])


def test_warmup_runs_and_bad_options(tmp_path, monkeypatch, capsys):
    calls = []
    denoise = Flow.denoise
    monkeypatch.setattr(Flow, "denoise", lambda self, *a, **k: calls.append(1) or denoise(self, *a, **k))
    out = tmp_path / "r.json"
    for warmup in (0, 2):
        calls.clear()
        assert (
            benchmark.main(
                [*TINY, "--dtype", "float32", "--stages", "denoise", "--warmup", str(warmup), "--json", str(out)]
            )
            == 0
        )
        assert len(calls) == 1 + warmup  # a slow stage can be measured once
        assert json.loads(out.read_text())["stages"]["denoise"]["time"]["n"] == 1
    capsys.readouterr()
    for bad, message in (
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--tokens", "some"], "--tokens must be auto, all or a number"),
        (["--cfg", "nan"], "--cfg"),
        (["--stages", "deep,decode"], "--stages: unknown decode"),
        (["--model", str(tmp_path / "nope")], "is not a folder"),
    ):
        assert benchmark.main(["--arch", "tiny", *bad]) == 1  # one error line, as every command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_score_and_invert_stages(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert benchmark.main([*TINY, "--stages", "score,invert", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    score, inv = r["stages"]["score"], r["stages"]["invert"]
    assert score["images_per_second"] > 0 and score["batch"] >= 1
    assert inv["tokens"] > 0 and inv["tokens_per_second"] > 0
    assert score["peak_memory"] >= r["stages"]["load"]["weight_bytes"]
    text = capsys.readouterr().out
    assert "images per second" in text and "per inversion" in text
    assert benchmark.main([*TINY, "--stages", "scor"]) == 1


def test_whole_command_peaks_from_the_stage_peaks():
    gb = 10**9
    st = {
        "load": {"weight_bytes": 8 * gb, "vae_weight_bytes": gb},
        "text": {"peak_memory": 14 * gb},  # a 5 GB text stage beside the flow and the VAE
        "vae": {"peak_memory": 9.5 * gb},
        "deep": {"peak_memory": 10 * gb},
        "denoise": {"peak_memory": 10.5 * gb},
    }
    w = stages.whole_command_peaks(st)
    assert w["peak_resident"] == 14 * gb
    # one-shot: text alone 5, decode alone 1.5, the flow's stages without the VAE 9 and 9.5
    assert w["peak_one_shot"] == pytest.approx(9.5 * gb) and w["peak_one_shot_stage"] == "denoise"
    assert w["whole_peak_stages"] == ["deep", "denoise", "text", "vae"]
    assert stages.whole_command_peaks({"load": {}})["peak_one_shot"] is None


def test_8bit_kv_cache_in_the_benchmark(tmp_path):
    out = tmp_path / "r.json"
    sizes = {}
    for extra in ([], ["--kv-bits", "8"]):
        args = [*TINY, "--dtype", "bfloat16", "--tokens", "2", "--stages", "prefill,deep", "--json", str(out)]
        assert benchmark.main(args + extra) == 0
        r = json.loads(out.read_text())
        sizes[bool(extra)] = r["stages"]["deep"]["kv_cache_bytes"]
    assert sizes[True] == pytest.approx(sizes[False] * 1.0625 / 2)  # 8 bits + bf16 scale and offset per 64


def test_blas_detection_from_the_mapped_files(tmp_path, monkeypatch):
    maps = tmp_path / "maps"
    mlx_blas = "/venv/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
    numpy_blas = "/venv/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so"
    line = "7f00-7f01 r-xp 00000000 08:01 1 {}\n"
    maps.write_text(line.format(mlx_blas) + line.format(numpy_blas) + "7f02-7f03 rw-p 0 0:0 0 [heap]\n")
    assert machine.loaded_blas(str(maps)) == {"optimised": None, "reference": mlx_blas}
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    maps.write_text(line.format(openblas) + line.format(mlx_blas))
    assert machine.loaded_blas(str(maps))["optimised"] == openblas
    mkl = "/opt/intel/lib/libmkl_rt.so.2"
    maps.write_text(line.format(mkl) + line.format(mlx_blas))
    assert machine.loaded_blas(str(maps))["optimised"] == mkl
    assert machine.loaded_blas(str(tmp_path / "none")) == {"optimised": None, "reference": None}
    # the one command line: preloaded OpenBLAS, installed first where it is missing
    monkeypatch.setattr(machine, "openblas_path", lambda machine=None: str(tmp_path / "libblas.so.3"))
    assert machine.blas_command("run it").startswith("sudo apt install libopenblas0-pthread && LD_PRELOAD=")
    (tmp_path / "libblas.so.3").write_text("")
    assert machine.blas_command("run it") == f"LD_PRELOAD={tmp_path / 'libblas.so.3'} run it"


class _Terminal:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_generate_says_once_on_a_terminal_when_mlx_runs_the_reference_blas(monkeypatch):
    monkeypatch.setattr(common, "_BLAS_SAID", [])
    monkeypatch.setattr(machine, "reference_blas", lambda: True)
    pipe = _Terminal(False)
    assert not common.blas_note_once("cmd", pipe) and pipe.text == ""  # a log or a pipe: nothing
    tty = _Terminal(True)
    assert common.blas_note_once("python -m mlx_starflow.generate --model demo", tty)
    assert "reference BLAS" in tty.text and "LD_PRELOAD=" in tty.text and "--model demo" in tty.text
    assert not common.blas_note_once("cmd", tty) and tty.text.count("reference BLAS") == 1  # once
    monkeypatch.setattr(common, "_BLAS_SAID", [])
    monkeypatch.setattr(machine, "reference_blas", lambda: False)
    assert not common.blas_note_once("cmd", _Terminal(True))  # an optimised BLAS loaded: nothing to say
