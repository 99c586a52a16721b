"""The video benchmark (tools/video_benchmark.py) and the clip's memory computed from the shapes
(tools/video_memory.py): tiny random video models, nothing timed against a figure."""

import mlx.core as mx
import pytest

from mlx_starflow.cli.benchmark import main as benchmark_main
from mlx_starflow.sample import Jacobi
from mlx_starflow.tools import video_benchmark as vb
from mlx_starflow.tools import video_memory as vm
from mlx_starflow.video_sample import sample_video_steps

# The released 7B's parameters (the "param" rows of starflow-v_7B_keys.tsv).
PARAMS_7B = 6_890_096_528


@pytest.fixture(scope="module")
def tiny():
    return vb.arch_shapes("tiny"), vb.random_video_flow("tiny")


def test_7b_shapes_are_the_released_ones():
    s = vm.video_shapes()
    assert s.flow.linear + s.flow.plain == PARAMS_7B
    assert (s.height, s.width, s.tokens_per_frame, s.txt_size) == (480, 848, 30 * 53, 256)
    assert (s.deep_layers, s.deep_kv_heads, s.head_dim, s.trained_frames) == (24, 64, 64, 21)
    assert s.latent_frames(81) == 21
    # 81 frames in bf16 with guidance: 24 layers x (keys, values) x 2 rows x (256 + 21 x 1590) positions x 4096 x 2 B
    assert vm.deep_cache_bytes(s, 21, None, 2, 2) == 24 * 2 * 2 * (256 + 21 * 1590) * 4096 * 2


@pytest.mark.parametrize("window", [None, 2])
def test_computed_kv_bytes_equal_the_sampler_cache(tiny, window, monkeypatch):
    """The deep block's cache as sample_video_steps allocates it, for the whole clip and for a window."""
    s, flow = tiny
    block = flow.blocks[-1]
    built = []
    new_caches = block.new_caches

    def spy(batch, length, bits=None):
        caches = new_caches(batch, length, bits)
        built.append(sum(c.nbytes for c in caches))
        return caches

    monkeypatch.setattr(block, "new_caches", spy)
    cfg = flow.config
    frames = s.latent_frames(9)
    h, w = s.height // cfg.pixels_per_latent, s.width // cfg.pixels_per_latent
    noise = mx.random.normal((1, frames, h, w, cfg.in_channels), key=mx.random.key(1))
    y = mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
    jac = None if window is None else Jacobi(4, 1e-3, 2)
    steps = sample_video_steps(flow, noise, y, 3.0, jacobi=jac, local_attn_window=window, context_length=1)
    next(steps)  # the deep block has allocated its cache
    steps.close()
    assert built == [vm.deep_cache_bytes(s, frames, window, 2, 4)]
    assert vm.deep_positions(s, frames, window) == s.txt_size + (window or frames) * s.tokens_per_frame


def test_the_window_bounds_the_peak():
    s = vm.video_shapes()
    full = [vm.peak(s, "bfloat16", f, None, decode=0) for f in (17, 41, 81)]
    windowed = [vm.peak(s, "bfloat16", f, 2, decode=0) for f in (17, 41, 81)]
    assert full == sorted(full) and full[0] < full[-1]
    assert max(windowed) - min(windowed) < 0.05 * vm.GB and windowed[-1] < full[-1] - 20 * vm.GB
    caches = {vm.deep_cache_bytes(s, s.latent_frames(f), 2, 2, 2) for f in (17, 81, 401, 1021)}
    assert len(caches) == 1  # the deep cache is the window's whatever the length
    # the frame-local shallow blocks take every latent frame as a row: their cache grows with the clip
    assert vm.shallow_cache_bytes(s, 101, 2) == 101 * vm.shallow_cache_bytes(s, 1, 2)
    # past the training length the command samples with the training window: 321 frames cost 81's cache
    assert vm.window_of(s, s.latent_frames(321), None) == 21
    # lower precisions never need more
    assert [vm.peak(s, p, 81, 5) for p in vm.PRECISIONS] == sorted(
        (vm.peak(s, p, 81, 5) for p in vm.PRECISIONS), reverse=True
    )


def test_fit_rows_pick_what_fits():
    s = vm.video_shapes()
    for r in vm.fit_rows(s, decode=0):
        if r["window"]:
            assert vm.fits(r["peak_window"], r["available"])
            if r["window"] < r["latent"]:
                assert not vm.fits(vm.peak(s, r["precision"], 81, r["window"] + 1, decode=0), r["available"])
            assert (r["longest"] - 1) % 4 == 0 and r["longest"] >= 81
        else:
            assert not vm.fits(vm.peak(s, r["precision"], 81, 1, decode=0), r["available"])


def test_per_layer_extrapolation_is_linear():
    assert vb.per_layer(3.0, 5.0, 2, 24) == pytest.approx(3.0 + 23 * 2.0)
    assert vb.per_layer(3.0, 9.0, 4, 7) == pytest.approx(3.0 + 6 * 2.0)
    assert vb.per_layer(3.0, 3.0, 1, 1) == 3.0


def test_frame_benchmark_on_a_tiny_model():
    m = vb.measure_frame("tiny", tokens=1, log=lambda *_: None)
    s = vb.arch_shapes("tiny")
    assert m["latent_frames"] == 3 and m["frame"] == 2 and m["tokens_per_frame"] == s.tokens_per_frame
    for name in ("deep", "shallow", "denoise", "decode"):
        info = m["stages"][name]
        assert info["seconds"] > 0 and info["peak_memory"] > 0
    deep = m["stages"]["deep"]
    assert deep["caches_built"] == deep["caches_full"] == vm.deep_cache_bytes(s, 3, None, 2, 4)
    assert m["stages"]["decode"]["video_frames"] == 4
    clip = vb.estimate_clip(m, s)
    assert set(clip["seconds"]) == {"deep", "shallow", "denoise", "decode"}
    assert set(clip["peaks"]) == set(vm.PRECISIONS) and clip["total_seconds"] > 0
    lines = vb.summary_lines(m, clip)
    assert lines[0].startswith("summary: one latent frame") and "not measured" in lines[-1]


def test_layers_built_are_cut_and_extrapolated():
    m = vb.measure_frame("tiny", layers=1, stages=("deep",), tokens=1, log=lambda *_: None)
    deep = m["stages"]["deep"]
    assert deep["layers_timed"] == 1 and m["layers_built"] == 1
    # the cache built holds 1 layer of the 2; the full model's is computed from the shapes
    assert 2 * deep["caches_built"] == deep["caches_full"]


def test_video_flag_of_the_benchmark_command(tmp_path, capsys):
    out = tmp_path / "v.json"
    rc = benchmark_main(["--video", "--arch", "tiny", "--stages", "deep,decode", "--tokens", "1", "--json", str(out)])
    assert rc == 0 and out.is_file()
    assert "summary: one latent frame" in capsys.readouterr().out
    assert benchmark_main(["--video", "--arch", "tiny", "--stages", "nope"]) == 1
    assert benchmark_main(["--video", "--arch", "tiny", "--repeats", "0"]) == 1
    capsys.readouterr()
    args = ["--video", "--arch", "tiny", "--stages", "text,load,deep", "--tokens", "1", "--tmp", str(tmp_path)]
    assert benchmark_main(args) == 0
    out = capsys.readouterr().out
    assert "text encoder" in out and "load (" in out and "not measured (left out of the time): shallow" in out


def test_each_stage_builds_its_own_part():
    deep = vb.random_video_flow("tiny", only="deep")
    shallow = vb.random_video_flow("tiny", only="shallow")
    den = vb.random_video_flow("tiny", only="denoise")
    full = vb.random_video_flow("tiny")
    built = [[len(getattr(b, "attn_blocks", [])) for b in f.blocks] for f in (deep, shallow, den)]
    assert built == [[0, 0, 2], [1, 0, 0], [0, 0, 0]]
    assert "learnable_self_denoiser" in den and "learnable_self_denoiser" not in deep
    assert "learnable_self_denoiser" not in shallow and "learnable_self_denoiser" in full
    with pytest.raises(ValueError, match="only must be"):
        vb.random_video_flow("tiny", only="vae")


def test_the_clip_takes_every_frame_on_the_line_through_the_first_and_the_last():
    m = vb.measure_frame("tiny", stages=("deep",), tokens=1, repeats=2, log=lambda *_: None)
    s = vb.arch_shapes("tiny")
    d = m["stages"]["deep"]
    assert d["prefix_first_frame"] == s.txt_size and d["prefix"] == s.txt_size + 2 * s.tokens_per_frame
    clip = vb.estimate_clip(m, s)
    # three latent frames at prefixes p0, p0 + F, p0 + 2F: the mean of the ends, three times
    assert clip["seconds"]["deep"] == pytest.approx(1.5 * (d["seconds_first_frame"] + d["seconds"]))
    m["stages"]["deep"].pop("prefix_first_frame")
    assert vb.estimate_clip(m, s)["seconds"]["deep"] == pytest.approx(3 * d["seconds"])


def test_load_and_text_stages(tmp_path):
    load = vb.measure_load("tiny", folder=tmp_path, log=lambda *_: None)
    assert load["bytes"] > 0 and load["bytes_per_second"] > 0
    assert list(tmp_path.iterdir()) == []  # the folder written is removed
    text = vb.measure_text("tiny", layers=1, log=lambda *_: None)
    assert text["layers_timed"] == 1 and text["seconds"] > 0
    m = {"precision": "float32", "frames": 9, "stages": {"load": load, "text": text}}
    s = vb.arch_shapes("tiny")
    clip = vb.estimate_clip(m, s)
    assert clip["load_bytes"] == s.flow.bytes("float32", None) + s.text.bytes("float32") + s.vae.bytes("float32")
    assert clip["seconds"]["load"] == pytest.approx(clip["load_bytes"] / load["bytes_per_second"])
    assert clip["seconds"]["text"] == text["seconds"]
