"""End to end: a tiny complete release on disk in the original formats (a STARFlow
.pth and YAML config, a T5 with a tokenizer trained here, an SD-VAE), driven
through the Python API and `python -m mlx_starflow.generate`."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import default_sigint, save_reference, tiny_flow
from PIL import Image

from mlx_starflow.images import read_metadata
from mlx_starflow.loading.hub import ModelNotFound
from mlx_starflow.loading.resolve import resolve
from mlx_starflow.pipeline import Cancelled, Pipeline
from mlx_starflow.sample import sample

ROOT = Path(__file__).resolve().parents[1]
T5_WIDTH = 48  # test_t5's gated-gelu config


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from test_t5 import make_t5
    from test_text import make_tokenizer
    from test_vae import make_reference

    root = tmp_path_factory.mktemp("release")
    model, args = tiny_flow({"img_size": 32, "txt_size": 6, "learnable_self_denoiser": 0}, txt_dim=T5_WIDTH)
    save_reference(model, args, root)
    (root / "model.pth").rename(root / "tiny_t2i.pth")
    (root / "config.yaml").rename(root / "tiny_t2i.yaml")
    make_t5(root / "text_encoder")
    make_tokenizer(root / "text_encoder", "t5")
    make_reference(root / "vae", block_out_channels=(8, 8, 8, 8), norm_num_groups=4)  # 8x down
    return root


@pytest.fixture(scope="module")
def pipe(release, cache):
    return Pipeline.from_pretrained(str(release))


def test_resolves_offline_and_converts_once(release, cache):
    first = resolve(str(release))
    assert first.flow.parent == cache and first.text_encoder.endswith("text_encoder")
    assert first.vae.endswith("vae")
    stamp = (first.flow / "model.safetensors").stat().st_mtime_ns
    again = resolve(str(release))
    assert again.flow == first.flow and (again.flow / "model.safetensors").stat().st_mtime_ns == stamp
    meta = json.loads((first.flow / "config.json").read_text())
    assert meta["source"]["checkpoint"] == "tiny_t2i.pth" and "mlx" in meta["converted_with"]
    assert (first.flow / "LICENSE_MODEL").is_file()


def test_images_seeds_and_reuse(pipe):
    a = pipe.generate("a cat in the snow", seed=3, num_images=2, sampler="sequential")
    assert [im.size for im in a.images] == [(32, 32)] * 2 and a.images[0].mode == "RGB"
    assert a.seeds == [3, 4] and a.latents.shape == (2, 4, 4, 4)
    assert set(a.timings) >= {"text", "deep", "shallow", "denoise", "decode"} and a.peak_memory > 0
    b = pipe.generate("a cat in the snow", seed=3, num_images=2, sampler="sequential")
    np.testing.assert_array_equal(np.array(a.latents), np.array(b.latents))
    np.testing.assert_array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    # the two images of one call have different seeds, so differ
    assert np.abs(np.array(a.latents[0]) - np.array(a.latents[1])).max() > 1e-3
    c = pipe.generate("a cat in the snow", seed=99, sampler="sequential")
    assert np.abs(np.array(c.latents[0]) - np.array(a.latents[0])).max() > 1e-3


def test_batch_of_prompts_matches_single_calls(pipe):
    # sequential: Jacobi's stopping rule looks at the whole batch, as the reference's does
    both = pipe.generate(["a dog", "a red fox"], seed=[5, 6], sampler="sequential", denoise="none")
    one = pipe.generate("a red fox", seed=6, sampler="sequential", denoise="none")
    np.testing.assert_allclose(np.array(both.latents[1]), np.array(one.latents[0]), atol=1e-4)
    assert both.prompts == ["a dog", "a red fox"]


def test_explicit_latents_reproduce_the_flow(pipe):
    noise = pipe.noise([11], pipe.latent_shape())
    res = pipe.generate("a dog", latents=noise, guidance=2.0, sampler="sequential", denoise="none")
    enc = pipe._text_loader()
    y = mx.concatenate([enc.encode(["a dog"]), enc.encode([""])])
    direct = sample(pipe.flow, noise, y, guidance=2.0)
    np.testing.assert_allclose(np.array(res.latents), np.array(direct), atol=1e-5)
    seeded = pipe.generate("a dog", seed=11, guidance=2.0, sampler="sequential", denoise="none")
    np.testing.assert_allclose(np.array(seeded.latents), np.array(res.latents), atol=1e-6)


def test_progress_cancel_and_still_usable(pipe):
    stages = []

    def cancel(stage, done, total):
        stages.append(stage)
        return not (stage == "deep" and done >= 3)

    with pytest.raises(Cancelled):
        pipe.generate("a dog", seed=1, sampler="sequential", progress=cancel)
    assert stages[0] == "text" and stages[-1] == "deep"
    seen = []
    pipe.generate("a dog", seed=1, sampler="sequential", progress=lambda s, d, t: seen.append((s, d, t)))
    order = list(dict.fromkeys(s for s, _, _ in seen))
    assert order == ["text", "deep", "shallow", "denoise", "decode"]
    assert seen[-1] == ("decode", 1, 1) and ("deep", 16, 16) in seen and ("shallow", 32, 32) in seen


def test_concurrent_calls_are_serialised(pipe):
    out = {}

    def run(seed):
        out[seed] = pipe.generate("a dog", seed=seed, sampler="sequential", denoise="none").latents

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    alone = pipe.generate("a dog", seed=2, sampler="sequential", denoise="none").latents
    np.testing.assert_allclose(np.array(out[2]), np.array(alone), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=[]), "at least one prompt"),
        (dict(prompt=["ok", 3]), "strings"),
        (dict(prompt="x", guidance=-1), "guidance"),
        (dict(prompt="x", num_images=0), "num_images"),
        (dict(prompt="x", height=64, width=64), "32x32 images only"),
        (dict(prompt="x", height=30), "multiple of 8"),
        (dict(prompt="x", jacobi_block_size=0), "jacobi_block_size must be a whole number from 1 to 4096"),
        (dict(prompt="x", sampler="euler"), "sampler"),
        (dict(prompt="x", denoise="learned"), "no learnable denoiser"),
        (dict(prompt="x", seed=[1, 2]), "2 seeds for 1 images"),
        (dict(prompt="x", latents=np.zeros((1, 8, 8, 4), np.float32)), "latents must have shape"),
        (dict(prompt="x", guidance=float("nan")), "guidance must be >= 0 and finite"),
        (dict(prompt="x", guidance=float("inf")), "guidance must be >= 0 and finite"),
        (dict(prompt="x", jacobi_threshold=-0.1), "threshold"),
        (dict(prompt="x", num_images=True), "num_images"),
    ],
)
def test_bad_arguments_fail_before_work(pipe, kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        pipe.generate(**kwargs, progress=lambda *a: calls.append(a))
    assert calls == []


def test_unknown_option_and_options_object(pipe):
    from mlx_starflow.pipeline import GenerateOptions

    with pytest.raises(TypeError, match="unknown generation option.*guidence"):
        pipe.generate("x", guidence=2.0)
    a = pipe.generate(GenerateOptions("a cat", seed=3, sampler="sequential", guidance=1.0))
    b = pipe.generate("a cat", seed=3, sampler="sequential", guidance=1.0)
    np.testing.assert_array_equal(np.array(a.latents), np.array(b.latents))


def test_generation_never_loads_the_vae_encoder(pipe):
    from mlx.utils import tree_flatten

    from mlx_starflow.loading import device

    assert pipe.vae.encoder is None
    # the device's measures are applied by the loader: strips of rows on a CPU, MLX's own convolution elsewhere
    strips = device.CONV_STRIP_ELEMENTS if device.on_cpu() else None
    assert pipe.vae.decoder.conv_in.strip_elements == strips
    assert not any(k.startswith("encoder.") for k, _ in tree_flatten(pipe.vae.parameters()))
    # Encoding an image loads it on first use; decoding is unchanged.
    img = mx.zeros((1, 32, 32, 3))
    before = np.array(pipe.decode(mx.ones((1, 4, 4, 4)))[0])
    z = pipe.encode_images(img)
    assert z.shape == (1, 4, 4, 4) and pipe.vae.encoder is not None
    np.testing.assert_array_equal(np.array(pipe.decode(mx.ones((1, 4, 4, 4)))[0]), before)


def test_generate_steps_yield_previews_and_the_result(pipe):
    steps = list(pipe.generate_steps("a cat", seed=1, sampler="sequential"))
    stages = [e.stage for e in steps]
    assert stages[0] == "text" and stages[-1] == "decode" and steps[-1].result is not None
    deep = [e for e in steps if e.stage == "deep"]
    assert deep and deep[0].step.preview().shape == (1, 4, 4, 4)
    assert all(e.result is None for e in steps[:-1])


def test_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFound, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve("apple/starflow")
    with pytest.raises(ModelNotFound, match="expected one converted model"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFound, match="no such file or folder"):
        resolve(str(tmp_path / "nothing" / "here"))


def cli(*args, cache=None, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cache:
        env["MLX_STARFLOW_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "mlx_starflow.generate", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


def test_command_line(release, cache, tmp_path):
    out = tmp_path / "img-{seed}-{index}.png"
    r = cli(
        "--model",
        str(release),
        "--prompt",
        "a cat",
        "a dog",
        "--seed",
        "7",
        "--cfg",
        "2.5",
        "--sampler",
        "jacobi",
        "--output",
        str(out),
        "--metadata",
        "--verbose",
        cache=cache,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-7-0.png", "img-8-1.png"]
    meta = read_metadata(files[1])
    assert meta["prompt"] == "a dog" and meta["seed"] == 8 and meta["guidance"] == 2.5
    assert meta["sampler"] == "jacobi" and meta["jacobi_block_size"] == 16 and meta["engine"].startswith("mlx-starflow")
    assert json.loads(files[0].with_suffix(".json").read_text())["seed"] == 7
    assert Image.open(files[0]).size == (32, 32)
    assert "Deep block" in r.stderr and "peak memory" in r.stderr
    # never overwrites
    again = cli(
        "--model",
        str(release),
        "--prompt",
        "a cat",
        "--seed",
        "7",
        "--output",
        str(tmp_path / "img-{seed}-0.png"),
        cache=cache,
    )
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize(
    "args,match",
    [
        (["--cfg", "-1"], ">= 0"),
        (["--num-images", "0"], "num-images"),
        (["--output", "/nonexistent/dir/x.png"], "does not exist"),
        (["--model", "/no/such/model"], "no such file or folder"),
        (["--jacobi-block-size", "0"], "--jacobi-block-size: jacobi_block_size must be a whole number from 1"),
    ],
)
def test_command_line_mistakes(release, cache, tmp_path, args, match):
    base = ["--model", str(release), "--prompt", "a cat", "--output", str(tmp_path / "x.png")]
    r = cli(*base, *args, cache=cache)
    assert r.returncode != 0 and match in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.png"))


def test_command_line_rejects_unknown_option(release, cache):
    r = cli("--model", str(release), "--prompt", "x", "--bogus", cache=cache)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


def test_inference_never_needs_torch(release, cache):
    # torch made unimportable: loading the converted model, encoding, sampling and decoding still work
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mlx_starflow import Pipeline\n"
        f"p = Pipeline.from_pretrained({str(release)!r})\n"
        "r = p.generate('a cat', seed=1, sampler='sequential')\n"
        "print(r.images[0].size)\n"
    )
    env = dict(os.environ, MLX_STARFLOW_CACHE=str(cache), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(32, 32)" in run.stdout


def test_tiled_decoding_and_precision_options(release, cache, pipe):
    tiled = Pipeline.from_pretrained(str(release), vae_tile=2, text_dtype="bfloat16", keep_text_encoder=True)
    a = tiled.generate("a cat", seed=4, sampler="sequential", denoise="none")
    b = pipe.generate("a cat", seed=4, sampler="sequential", denoise="none")
    assert a.images[0].size == (32, 32)
    assert np.abs(np.array(a.latents) - np.array(b.latents)).max() < 0.2  # bf16 text embeddings
    assert tiled._text is not None  # kept loaded
    with pytest.raises(ValueError, match="vae_tile"):
        Pipeline.from_pretrained(str(release), vae_tile=1)
    with pytest.raises(ValueError, match="text_quantize must be one of 4, 8, not 3"):
        Pipeline.from_pretrained(str(release), text_quantize=3)


def _hf_cache(home, repo, files, rev="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache entry as huggingface-hub lays it out."""
    import shutil

    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for src, name in files:
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snap / name)
    return snap


def test_repo_ids_from_the_hugging_face_cache_offline(release, tmp_path):
    home = tmp_path / "hf"
    _hf_cache(
        home,
        "apple/starflow",
        [(release / "tiny_t2i.pth", "tiny_t2i.pth"), (release / "tiny_t2i.yaml", "tiny_t2i.yaml")],
    )
    t5 = _hf_cache(home, "google/flan-t5-xl", [])
    for f in (release / "text_encoder").iterdir():
        (t5 / f.name).write_bytes(f.read_bytes())
    vae = _hf_cache(home, "stabilityai/sd-vae-ft-ema", [])
    for f in (release / "vae").iterdir():
        (vae / f.name).write_bytes(f.read_bytes())
    # huggingface-hub reads HF_HOME and HF_HUB_OFFLINE when imported: a fresh process
    code = (
        "import json\n"
        "from mlx_starflow.loading.resolve import resolve\n"
        "from mlx_starflow import Pipeline\n"
        "w = resolve('apple/starflow', checkpoint='tiny_t2i.pth')\n"
        "meta = json.loads((w.flow / 'config.json').read_text())\n"
        "print(w.text_encoder, w.vae, meta['source']['repo'], meta['source']['revision'][:4])\n"
        "r = Pipeline.from_pretrained('apple/starflow', checkpoint='tiny_t2i.pth').generate('a cat', seed=1)\n"
        "print(r.images[0].size)\n"
    )
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", MLX_STARFLOW_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "google/flan-t5-xl stabilityai/sd-vae-ft-ema apple/starflow 0123" in run.stdout
    assert "(32, 32)" in run.stdout


def test_auto_precision_policy(tmp_path, monkeypatch):
    import mlx.core as mx

    from mlx_starflow import pipeline

    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((8, 8)), "h": mx.zeros((8,), mx.bfloat16)})
    assert pipeline._auto_dtype(tmp_path) is None  # small float32: as stored
    # above the threshold (a billion float32 parameters for real), bfloat16; only float32 tensors count
    monkeypatch.setattr(pipeline, "BF16_ABOVE", 8 * 8 * 4 - 1)
    assert pipeline._auto_dtype(tmp_path) == "bfloat16"
    monkeypatch.setattr(pipeline, "BF16_ABOVE", 8 * 8 * 4)
    assert pipeline._auto_dtype(tmp_path) is None


def test_demo_model_from_the_command_line(tmp_path):
    out = tmp_path / "demo.png"
    r = cli("--model", "demo", "--prompt", "red circle", "--seed", "1", "--output", str(out))
    assert r.returncode == 0, r.stderr
    meta = read_metadata(out)
    assert meta["prompt"] == "red circle" and meta["model"] == "demo" and meta["denoise"] == "score"
    assert Image.open(out).size == (32, 32)
    bad = cli("--model", "demo", "--prompt", "purple hexagon", "--output", str(tmp_path / "x.png"))
    assert bad.returncode == 1 and '"red circle"' in bad.stderr and '"yellow triangle"' in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.png").exists()


def test_ctrl_c_stops_cleanly(tmp_path):
    import fcntl
    import pty
    import signal
    import struct
    import termios
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # stderr on a terminal (a pty), where the progress bars are drawn
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # tqdm draws nothing 0 columns wide
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_starflow.generate",
            "--model",
            "demo",
            "--prompt",
            "red circle",
            "--num-images",
            "64",
            "--output",
            str(tmp_path / "x-{index}.png"),
        ],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        preexec_fn=default_sigint,
    )
    os.close(slave)
    seen = b""
    deadline = time.time() + 60
    while b"Deep block" not in seen and time.time() < deadline:  # wait until sampling runs
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert b"Deep block" in seen, seen.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    while True:  # what the child wrote after the bar
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    err = seen.decode(errors="replace")
    assert proc.returncode == 130 and "interrupted: no image was written" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_a_vae_of_two_levels_generates_at_its_own_scale(tmp_path, monkeypatch):
    """The latent grid comes from the VAE (2 ** (levels - 1)), not an assumed 8:
    16x16 images from 8x8 latents, the flow's sample and the VAE's decoding as the
    reference computes them (the flow as built from the reference weights, diffusers)."""
    import diffusers
    import torch
    from tiny_release import make_release

    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "release"
    root.mkdir()
    model, _ = make_release(root, img_size=16, vae_channels=(8, 8))
    pipe = Pipeline.from_pretrained(str(root))
    assert pipe.latent_shape() == (8, 8, 4) and pipe.image_size() == 16
    noise = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    r = pipe.generate("a cat", latents=noise, guidance=2.0, sampler="sequential", denoise="none")
    assert r.images[0].size == (16, 16) and r.params["height"] == 16
    y = pipe.conditioning(["a cat"], "", guided=True)[0]
    ref = sample(model, mx.array(noise), y, 2.0)
    np.testing.assert_allclose(np.array(r.latents), np.array(ref), rtol=1e-4, atol=1e-4)
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        z = torch.from_numpy(np.array(r.latents)).permute(0, 3, 1, 2) / vae.config.scaling_factor
        x = vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    expected = np.round((x[0] + 1) * 127.5)
    assert np.abs(np.asarray(r.images[0], dtype=np.float32) - expected).max() <= 1


def test_encode_waits_for_a_running_call(pipe):
    """encode shares the text encoder with generate: it takes the pipeline's lock."""
    done = threading.Event()
    with pipe._lock:  # as a generate call in another thread holds it
        t = threading.Thread(target=lambda: (pipe.encode(["a cat"]), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5)
    assert done.wait(60)
    t.join(5)


def test_decoding_reports_each_image_and_stops_between_them(pipe):
    seen = []

    def stop_after_first(stage, done, total):
        seen.append((stage, done, total))
        return not (stage == "decode" and done >= 1)

    with pytest.raises(Cancelled):
        pipe.generate("a cat", num_images=3, seed=2, sampler="sequential", denoise="none", progress=stop_after_first)
    assert [e for e in seen if e[0] == "decode"] == [("decode", 0, 3), ("decode", 1, 3)]
    r = pipe.generate("a cat", num_images=3, seed=2, sampler="sequential", denoise="none")  # still usable
    assert len(r.images) == 3


def test_the_score_step_reports_each_block_and_stops_between_them(pipe):
    seen = []

    def stop_in_denoise(stage, done, total):
        seen.append((stage, done, total))
        return not (stage == "denoise" and done >= 1)

    with pytest.raises(Cancelled):
        pipe.generate("a cat", seed=3, sampler="sequential", denoise="score", progress=stop_in_denoise)
    steps = [e for e in seen if e[0] == "denoise"]
    assert steps[0][1] == 0 and steps[-1][1] == 1 and steps[-1][2] > 1  # stopped after the first block
    # block by block equals the one-graph gradient of log p
    flow, cfg = pipe.flow, pipe.config
    x = mx.random.normal((1, cfg.input_size, cfg.input_size, cfg.in_channels), key=mx.random.key(0))
    y = pipe.encode(["a cat"])
    s = cfg.noise_std
    want = x + s * s * mx.grad(lambda v: flow.log_prob(v, y).sum())(x)
    np.testing.assert_allclose(np.array(flow.denoise(x, y)), np.array(want), rtol=1e-5, atol=1e-5)


def test_tiled_decoding_stops_between_tiles(release):
    tiled = Pipeline.from_pretrained(str(release), vae_tile=2)
    seen = []
    r = tiled.generate("a cat", seed=4, sampler="sequential", denoise="none", progress=lambda *e: seen.append(e))
    decode = [e for e in seen if e[0] == "decode"]
    assert len(decode) > 3 and decode[-1] == ("decode", 1, 1)  # a report per tile, then the image
    calls = []

    def stop_at_second_tile(stage, done, total):
        calls.append(stage)
        return not (stage == "decode" and calls.count("decode") == 2)

    with pytest.raises(Cancelled):
        tiled.generate("a cat", seed=4, sampler="sequential", denoise="none", progress=stop_at_second_tile)
    assert calls.count("decode") == 2 and len(r.images) == 1
