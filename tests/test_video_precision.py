"""Precision for video models: the flow quantized (4 and 8 bits, the image flows' rule) or in
bfloat16, the text encoder following it, `dtype="auto"` (precision_policy.choose_video), the
deep block's KV cache at 8 bits, and bad values rejected in one line. On the shipped
demo-video model (0.86M parameters, pixel space) and tiny random models."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import randomize
from test_video_flow import ARGS, TXT_DIM
from test_video_pipeline import save_folder

from mlx_starflow import video as video_module
from mlx_starflow.cli.generate import main
from mlx_starflow.demo_video import checker
from mlx_starflow.loading import precision_policy as pp
from mlx_starflow.loading.video import clip_shapes, load_video_flow, video_config_from_args
from mlx_starflow.models.video import VideoFlow
from mlx_starflow.options import OptionError
from mlx_starflow.tools import video_memory as vm
from mlx_starflow.video import VideoPipeline

PROMPT = "red circle moving right"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))


def clip(seed, **load):
    pipe = VideoPipeline.from_pretrained("demo-video", **load)
    r = pipe.generate(PROMPT, seed=seed, denoise="none")
    return np.array(r.latents), np.stack(r.frames).astype(np.int32), pipe


@pytest.fixture(scope="module")
def float32_clips():
    return {seed: clip(seed, dtype="float32")[:2] for seed in (0, 1)}


def test_quantized_flow_layers(float32_clips):
    _, _, pipe = clip(0, quantize=4, dtype="float32")
    layers = [m for _, m in pipe.flow.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(m.bits == 4 and m.group_size == 64 for m in layers)
    assert pipe.info["quantize"] == 4 and pipe.flow.config.quantization == {"bits": 4, "group_size": 64}
    # the projections into and out of the transformers stay in full precision, as for images
    assert all(type(b.proj_in) is nn.Linear and type(b.proj_out) is nn.Linear for b in pipe.flow.blocks)


@pytest.mark.parametrize(
    "load, mean_latent, mean_pixel, near",
    [
        # measured on the shipped demo-video (seed 0 / 1 / 2, denoising off; mean |latent change|,
        # then frames of 255): bf16 0.016 / 0.059 / 0.011, 1.9 / 7.2 / 1.3; 8-bit 0.011 / 0.014 /
        # 0.016, 1.3 / 1.7 / 2.0; 4-bit 0.195 / 0.194 / 0.113, 24 / 24 / 14, as far as another
        # seed's clip is (0.15-0.26): at 4 bits this 0.86M-parameter model samples another clip.
        ({"dtype": "bfloat16"}, 0.03, 4.0, True),
        ({"dtype": "float32", "quantize": 8}, 0.03, 4.0, True),
        ({"dtype": "float32", "quantize": 4}, 0.25, 30.0, False),
    ],
)
def test_lower_precisions_sample_a_clip_close_to_float32(float32_clips, load, mean_latent, mean_pixel, near):
    want, want_frames = float32_clips[0]
    got, frames, _ = clip(0, **load)
    assert np.abs(got - want).mean() < mean_latent
    assert np.abs(frames - want_frames).mean() < mean_pixel
    if near:  # much closer to the float32 clip than another seed's clip is
        other = np.abs(float32_clips[1][0] - want).mean()
        assert np.abs(got - want).mean() < 0.5 * other
    else:  # another clip, but still the prompt's: its colour in every frame, moving right
        r = checker.evaluate(frames.astype(np.uint8)[None], [PROMPT])
        assert r["colour_accuracy"] == 1.0 and r["direction_accuracy"] == 1.0, checker.format_report(r)


def test_an_8_bit_kv_cache_samples_close_to_float(float32_clips):
    pipe = VideoPipeline.from_pretrained("demo-video", dtype="float32")
    r = pipe.generate(PROMPT, seed=0, denoise="none", kv_bits=8)
    want = float32_clips[0][0]
    assert np.abs(np.array(r.latents) - want).mean() < 0.03 and r.params["kv_bits"] == 8
    caches = pipe.flow.blocks[-1].new_caches(2, 40, 8)
    assert type(caches[0]).__name__ == "QuantizedKVCache"


def test_auto_on_a_cpu_keeps_a_small_model_in_float32():
    pipe = VideoPipeline.from_pretrained("demo-video")
    assert pipe.info["dtype"] == "float32" and pipe.info["quantize"] is None
    assert pipe.info["precision"].startswith("precision: flow float32")
    assert all(v.dtype == mx.float32 for _, v in nn.utils.tree_flatten(pipe.flow.parameters()))


def text_folder(tmp_path):
    a = {**ARGS, "img_size": 16, "channel_size": 3, "patch_size": 4, "vid_size": "5:8"}
    cfg, video = video_config_from_args(a, txt_dim=TXT_DIM, vae_downsample=1)
    flow = randomize(VideoFlow(replace(cfg, vae=None, text_encoder=None), video), 0, 0.05)
    (tmp_path / "t5").mkdir()
    return save_folder(flow, tmp_path / "text-video"), tmp_path / "t5"


@pytest.mark.parametrize(
    "load, text",
    [
        ({"dtype": "float32"}, ("float32", None)),
        ({"dtype": "bfloat16"}, ("bfloat16", None)),
        ({"quantize": 8, "q_group_size": 32}, ("float32", 8)),
        ({"dtype": "bfloat16", "text_dtype": "float32"}, ("float32", None)),  # an explicit choice wins
    ],
)
def test_the_text_encoder_follows_the_flow(tmp_path, monkeypatch, load, text):
    folder, t5 = text_folder(tmp_path)
    seen = []
    monkeypatch.setattr(video_module, "load_text_encoder", lambda path, **kw: seen.append(kw))
    pipe = VideoPipeline.from_pretrained(str(folder), text_encoder=str(t5), **load)
    pipe._text_loader()
    assert (pipe.info["text_dtype"], pipe.info["text_quantize"]) == text
    want = {"bfloat16": mx.bfloat16, "float32": mx.float32}[text[0]]
    assert seen[0]["dtype"] == want
    assert seen[0]["quantize"] == (None if text[1] is None else {"bits": 8, "group_size": load.get("q_group_size", 64)})


@pytest.mark.parametrize(
    "load, option",
    [
        ({"dtype": "float64"}, "dtype"),
        ({"quantize": 3}, "quantize"),
        ({"quantize": 4, "q_group_size": 50}, "q_group_size"),
        ({"text_dtype": "float16"}, "text_dtype"),
        ({"text_quantize": 2}, "text_quantize"),
        ({"vae_dtype": "int8"}, "vae_dtype"),
    ],
)
def test_bad_precision_options_name_the_option(load, option):
    with pytest.raises(OptionError) as e:
        VideoPipeline.from_pretrained("demo-video", **load)
    assert e.value.option == option and len(str(e.value).splitlines()) == 1


def test_bad_kv_bits_named():
    pipe = VideoPipeline.from_pretrained("demo-video")
    with pytest.raises(OptionError) as e:
        pipe.generate_steps(PROMPT, kv_bits=3)
    assert e.value.option == "kv_bits"


def test_command_quantized_clip_and_bad_values(tmp_path, capsys):
    out = tmp_path / "q.mp4"
    args = ["--model", "demo-video", "--prompt", PROMPT, "--seed", "1", "--no-progress"]
    assert main(args + ["--quantize", "4", "--kv-bits", "8", "--output", str(out)]) == 0
    from mlx_starflow.videos import read_metadata

    meta = read_metadata(out)
    assert meta["quantize"] == 4 and meta["kv_bits"] == 8  # --from-video replays them
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse: a choice out of the list, before anything is loaded
        main(args + ["--quantize", "3", "--output", str(tmp_path / "bad.mp4")])
    err = capsys.readouterr().err
    assert "--quantize" in err and "invalid choice" in err
    assert not (tmp_path / "bad.mp4").exists()


def test_a_quantized_folder_loads_as_stored(tmp_path):
    flow = load_video_flow(video_module.resolve_video("demo-video").flow, dtype="float32", quantize=8)
    from mlx.utils import tree_flatten

    out = save_folder(flow, tmp_path / "q8")
    again = load_video_flow(out)
    assert again.config.quantization == {"bits": 8, "group_size": 64}
    a, b = dict(tree_flatten(flow.parameters())), dict(tree_flatten(again.parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already quantized"):
        load_video_flow(out, quantize=4)


# -- the estimate ----------------------------------------------------------------------------


def released_clip_shapes(frames=81):
    s = vm.video_shapes()
    return pp.ClipShapes(
        flow=s.flow,
        deep_layers=s.deep_layers,
        deep_kv_heads=s.deep_kv_heads,
        head_dim=s.head_dim,
        positions=s.txt_size + s.latent_frames(frames) * s.tokens_per_frame,
        pixels=s.height * s.width,
        text=s.text,
        txt_size=s.txt_size,
        txt_dim=s.txt_dim,
        vae=s.vae,
        denoiser_heads=s.denoiser_heads,
        denoiser_width=s.denoiser_width,
    ), s


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("frames", [17, 81])
@pytest.mark.parametrize("prec", vm.PRECISIONS)
def test_the_policy_peak_follows_the_memory_tables(prec, frames, gpu):
    """choose_video's estimate (weights, the deep cache, the denoiser's largest terms, the decode)
    against tools/video_memory's fuller one (which adds the sampler's buffers, the shallow blocks,
    the frames kept): within 1% at the release's shapes, 480p (measured: 0.2% or less on a GPU,
    where the deep cache sets the peak, and on a CPU, where the denoiser's attention scores do at
    81 frames: 114 GB in bf16)."""
    shapes, s = released_clip_shapes(frames)
    dtype, bits = vm.precision(prec)
    td, tb = pp.text_follows(dtype, bits, True)
    policy = pp.whole_peak(pp.clip_peaks(shapes, dtype, bits, td, tb, gpu), False)
    tables = vm.peak(s, prec, frames, gpu=gpu)
    assert abs(policy - tables) < 0.01 * tables, (prec, policy / 1e9, tables / 1e9)


def test_auto_picks_what_fits():
    shapes, _ = released_clip_shapes(17)  # 5 latent frames: 23.1 GB in bf16, 13.2 at 4 bits (BENCHMARKS.md)
    big = pp.choose_video(shapes, gpu=True, available=48e9)
    assert (big.dtype, big.quantize, big.text_dtype) == ("bfloat16", None, "bfloat16")
    small = pp.choose_video(shapes, gpu=True, available=16e9)
    assert (small.quantize, small.text_quantize) == (4, 8) and "fits" in small.line
    none = pp.choose_video(shapes, gpu=True, available=8e9)
    assert none.quantize == 4 and "does NOT fit" in none.line and "--local-attn-window" in none.line
    cpu = pp.choose_video(shapes, gpu=False, available=256e9)
    assert cpu.dtype == "float32" and "fastest on a CPU" in cpu.line
    given = pp.choose_video(shapes, gpu=True, available=8e9, dtype="auto", quantize=8)
    assert (given.dtype, given.quantize) == ("bfloat16", 8)  # 7B float32 weights: the rest in bf16


def test_clip_shapes_of_a_folder(tmp_path):
    folder, _ = text_folder(tmp_path)
    s = clip_shapes(folder)
    # 5 frames of 16x16 pixels, 4x4 patches (16 tokens a frame), 3 text tokens; no VAE
    assert (s.positions, s.pixels, s.deep_layers, s.txt_size) == (3 + 5 * 16, 256, 2, 3)
    assert s.vae is None and s.flow.float32 > 0


@pytest.mark.parametrize("prec, dtype", [("bfloat16 + kv 8-bit", mx.bfloat16), ("float32 + kv 8-bit", mx.float32)])
def test_the_tables_kv8_bytes_are_the_quantized_cache(prec, dtype):
    from mlx_starflow.models.cache import make_cache

    cache = make_cache(2, 4, 100, 64, dtype, 8)
    assert cache.nbytes == vm.kv_bytes(1, 2, 4, 100, 64, vm.cache_value_bytes(prec))
    assert vm.cache_value_bytes(prec.removesuffix(vm.KV8)) == dtype.size
