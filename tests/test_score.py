"""Exact likelihood (mlx_starflow.score): the bits per dimension are the reference's
formula computed here in numpy from the model's own forward z and log-determinant;
the density agrees with sampling; the demo classifies its own shapes by likelihood;
bad input is refused cleanly."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import rand, tiny_flow
from PIL import Image

from mlx_starflow import demo
from mlx_starflow.cli.score import main
from mlx_starflow.demo import shapes
from mlx_starflow.images import from_pil, load_images
from mlx_starflow.loading.text import TextEncoder
from mlx_starflow.models.t5 import T5Config, T5Encoder
from mlx_starflow.models.vae import VAE, VAEConfig
from mlx_starflow.pipeline import Cancelled, Pipeline
from mlx_starflow.sample import sample
from mlx_starflow.score import log_densities, noise_draw, shared_blocks
from mlx_starflow.tools.benchmark import score_stage
from mlx_starflow.tools.machine import openblas_path
from mlx_starflow.tools.random_models import randomize as random_weights

ROOT = Path(__file__).resolve().parents[1]
TARFLOW_FIXTURE = ROOT.parent / "shared" / "fixtures" / "tarflow_tiny"
T2I_FIXTURE = ROOT.parent / "shared" / "fixtures" / "t2i_tiny"
ZERO_SHOT_SEED = 4_000_037  # images for zero-shot classification: not the held-out or evaluation seeds


def reference_bpd(flow, x, y, scale):
    """bits/dim of inputs x (B, H, W, C) under rows y: -log p(x) from the forward
    pass's z and log-determinant with a standard normal prior, plus log(scale) per
    dimension (0 for latents), over D ln 2."""
    z, logdet = flow(x, y)
    z, logdet = np.array(z, dtype=np.float64), np.array(logdet, dtype=np.float64)
    D = z[0].size
    log_p = -0.5 * np.square(z).reshape(len(z), -1).sum(1) - 0.5 * D * np.log(2 * np.pi) + logdet
    return (-log_p + D * np.log(scale)) / (D * np.log(2))


def rows(y, j, n):
    return None if y is None else mx.repeat(y[j : j + 1], n, axis=0)


@pytest.fixture(scope="module")
def demo_pipe():
    return Pipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def tarflow(tmp_path_factory):
    """apple/ml-tarflow's fixture model converted by the package when the fixtures are
    beside the repo, else a tiny TarFlow built here."""
    from mlx_starflow.loading.weights import convert_tarflow, load_flow

    if TARFLOW_FIXTURE.is_dir():
        out = tmp_path_factory.mktemp("tarflow") / "model"
        convert_tarflow(TARFLOW_FIXTURE / "model.pth", out, noise_std=0.07)
        return Pipeline(load_flow(out))
    from test_flow import tiny_tarflow

    return Pipeline(tiny_tarflow())


# -- the formulas ----------------------------------------------------------------------------


def test_tarflow_bits_per_dim_is_the_reference_formula(tarflow):
    pipe = tarflow
    s = pipe.image_size()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    noise = rng.random((2, 3, s, s, 3), dtype=np.float32)  # two dequantization draws, given
    prompts = ["0", "2", ""]  # "" scores with the mean class embedding, as evaluate_bpd
    r = pipe.score(images, prompts, dequant_noise=noise)
    ref = np.zeros((3, 3))
    labels = [mx.array([0] * 3), mx.array([2] * 3), None]
    for u in noise:
        x = mx.array(((images + u) / 256.0) * 2 - 1, dtype=mx.float32)
        ref += np.stack([reference_bpd(pipe.flow, x, y, 128) for y in labels], axis=1) / len(noise)
    np.testing.assert_allclose(r.bits_per_dim, ref, rtol=1e-5)
    D = s * s * 3
    np.testing.assert_allclose(r.nll, r.bits_per_dim * D * math.log(2), rtol=1e-12)
    assert r.bits_per_dim.shape == (3, 3) and r.prompts == prompts and r.space == "pixels" and r.dims == D
    assert r.samples == 2 and r.seed is None and r.sizes == [(s, s)] * 3 and not any(r.resized)
    # drawn from a seed: reproducible, and the seed is what draws them
    a = pipe.score(images[:1], "1", dequant_samples=2, seed=5)
    b = pipe.score(
        images[:1], "1", dequant_noise=np.stack([np.array(noise_draw(5, k, 2, (1, s, s, 3), True)) for k in range(2)])
    )
    np.testing.assert_allclose(a.bits_per_dim, b.bits_per_dim, rtol=1e-6)
    assert a.seed == 5 and "dequantization" in a.method
    c = pipe.score(images[:1], "1", seed=6)
    assert c.bits_per_dim[0, 0] != a.bits_per_dim[0, 0]


def test_demo_scores_dequantized_or_noised_like_its_held_out_figure(demo_pipe):
    pipe = demo_pipe
    images, labels = shapes.make_dataset(2, ZERO_SHOT_SEED + 1)
    prompts = ["red circle", "blue square", ""]  # "" is the unconditional label
    y = pipe.encode(prompts)
    u = images.astype(np.float32)
    # default: apple/ml-tarflow's dequantization, as for TarFlow
    r = pipe.score(images, prompts, seed=3)
    x = mx.array((u + np.array(noise_draw(3, 0, 1, images.shape, True))) / 128 - 1)
    ref = np.stack([reference_bpd(pipe.flow, x, rows(y, j, 2), 128) for j in range(3)], axis=1)
    np.testing.assert_allclose(r.bits_per_dim, ref, rtol=1e-5)
    # noise_samples: the training noise, in the units of docs/demo.md's held-out bits/dim
    g = pipe.score(images, prompts, noise_samples=2, seed=3)
    ref = 0
    for k in range(2):
        x = mx.array(shapes.to_model(images)) + 0.1 * noise_draw(3, k, 2, images.shape, False)
        ref = ref + np.stack([reference_bpd(pipe.flow, x, rows(y, j, 2), 127.5) for j in range(3)], axis=1) / 2
        held_out = demo.bpd_8bit(-np.array(pipe.flow.log_prob(x, rows(y, 0, 2))) / (32 * 32 * 3))
        np.testing.assert_allclose(held_out, reference_bpd(pipe.flow, x, rows(y, 0, 2), 127.5), rtol=1e-5)
    np.testing.assert_allclose(g.bits_per_dim, ref, rtol=1e-5)
    assert "noise_std 0.1" in g.method and g.samples == 2 and g.seed == 3
    # the shallow blocks the class does not enter are run once per image
    assert shared_blocks(pipe.flow) == 3


@pytest.fixture(scope="module")
def latent_pipe(tmp_path_factory):
    """A STARFlow in a VAE's latent space, apple/ml-starflow's t2i fixture model
    converted by the package (else a tiny one built here), with a real (random) T5
    and SD-VAE of 8x downsampling."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from mlx_starflow.loading.weights import convert_starflow, load_flow

    folder = tmp_path_factory.mktemp("text")
    if T2I_FIXTURE.is_dir():
        convert_starflow(T2I_FIXTURE / "model.pth", T2I_FIXTURE / "config.yaml", folder / "flow")
        flow = load_flow(folder / "flow")
    else:
        flow, _ = tiny_flow(txt_dim=16, img_size=32)
    width = flow.config.txt_dim
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a photo of a cat", "a dog in the snow", "a red fox"],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]),
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    t5 = random_weights(
        T5Encoder(
            T5Config(
                vocab_size=32, d_model=width, d_kv=8, num_heads=2, d_ff=32, num_layers=1, feed_forward_proj="gated-gelu"
            )
        ),
        seed=1,
    )
    vae = random_weights(VAE(VAEConfig(block_out_channels=[8, 8, 8, 8], norm_num_groups=4)), seed=2)

    def text_loader():
        return TextEncoder("t5", "hidden", t5, folder, flow.config.txt_size, width)

    return Pipeline(flow, text_loader, vae, vae_loader=lambda encoder: vae)


def test_latents_scored_through_the_vae(latent_pipe):
    pipe = latent_pipe
    s, g = pipe.image_size(), pipe.config.input_size
    images = np.random.default_rng(1).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    prompts = ["a cat", "a red fox", "a cat"]
    encoded = []
    enc = pipe._text_loader
    pipe._text_loader = lambda: _spy(enc(), encoded)
    try:
        r = pipe.score(images, prompts)
    finally:
        pipe._text_loader = enc
    assert encoded == [["a cat", "a red fox"]]  # each prompt's text once, in one call
    lat = pipe.encode_images(mx.array(shapes.to_model(images)))
    assert lat.shape == (2, g, g, 4)
    y = pipe.encode(prompts)
    ref = np.stack([reference_bpd(pipe.flow, lat, rows(y, j, 2), 1) for j in range(2)], axis=1)
    np.testing.assert_allclose(r.bits_per_dim[:, :2], ref, rtol=1e-5)
    np.testing.assert_array_equal(r.bits_per_dim[:, 2], r.bits_per_dim[:, 0])
    assert r.space == "latents" and r.dims == g * g * 4 and "not of its pixels" in r.method and r.seed is None
    # a noisy latent at the model's noise_std (0.3); the mean over draws is tested on pixel models
    n = pipe.score(images, prompts[:1], noise_samples=1, seed=2)
    ref = reference_bpd(pipe.flow, lat + 0.3 * noise_draw(2, 0, 1, lat.shape, False), rows(y, 0, 2), 1)
    np.testing.assert_allclose(n.bits_per_dim[:, 0], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="dequantization is for pixel models"):
        pipe.score(images, "a cat", dequant_samples=2)
    with pytest.raises(ValueError, match='"all" means every class of a class-conditional model'):
        pipe.score(images, "all")


class _spy:
    """A text encoder that records the prompts it is asked for."""

    def __init__(self, encoder, calls):
        self.encoder, self.calls = encoder, calls

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.encoder.encode(prompts)

    def release(self):
        self.encoder.release()


def test_sampled_latents_are_consistent_with_their_noise():
    # A latent STARFlow samples x from z without guidance: the density gives z back,
    # and log p(x) = log N(z) - log|det dx/dz| with the Jacobian of sampling itself.
    flow, _ = tiny_flow()
    z = rand((1, 4, 4, 4), 3)
    y = rand((1, flow.config.txt_size, flow.config.txt_dim), 4)
    x = sample(flow, z, y)
    back, _ = flow(x, y)
    assert np.abs(np.array(back) - np.array(z)).max() <= 1e-4 * np.abs(np.array(z)).max()
    D = z.size
    # the Jacobian's rows in one reverse pass: D copies of z, cotangent e_i on copy i
    _, (rows_) = mx.vjp(
        lambda v: sample(flow, v, mx.repeat(y, D, axis=0), compile_step=False),
        [mx.repeat(z, D, axis=0)],
        [mx.eye(D).reshape(D, 4, 4, 4)],
    )
    sign, logdet_sampling = np.linalg.slogdet(np.array(rows_[0], dtype=np.float64).reshape(D, D))
    zn = np.array(z, dtype=np.float64)
    prior = -0.5 * np.square(zn).sum() - 0.5 * D * np.log(2 * np.pi)
    assert sign != 0
    np.testing.assert_allclose(log_densities(flow, x, y)[0, 0], prior - logdet_sampling, rtol=1e-5)


# -- images ----------------------------------------------------------------------------------


def test_images_are_resized_and_centre_cropped_as_from_pil(tmp_path):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    path = tmp_path / "wide.png"
    img.save(path)
    x, sizes = load_images([path, img, np.asarray(img)], 32)
    assert x.shape == (3, 32, 32, 3) and sizes == [(64, 48)] * 3
    np.testing.assert_array_equal(np.array(x[0]), np.array(from_pil(img, 32, factor=1)[0]))
    np.testing.assert_array_equal(np.array(x[0]), np.array(x[2]))
    assert float(mx.min(x)) >= -1 and float(mx.max(x)) <= 1
    same, _ = load_images(np.asarray(img)[None, 8:40, 16:48], 32, resize=False)  # an (N, H, W, 3) batch
    np.testing.assert_allclose(np.array(same[0]), np.asarray(img)[8:40, 16:48] / 127.5 - 1, atol=1e-6)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    Image.new("L", (40, 40), 128).save(d / "grey.png")
    Image.new("RGB", (20, 40)).save(d / "small.png")
    Image.new("RGB", (64, 48)).save(d / "big.png")
    (d / "text.png").write_bytes(b"not an image")
    frames = [Image.new("RGB", (32, 32), (60 * i, 0, 0)) for i in range(3)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    (d / "dir.png").mkdir()
    return d


BAD = [
    ("missing.png", {}, "missing.png: no such file"),
    ("text.png", {}, "cannot read .*text.png as an image"),
    ("anim.gif", {}, r"anim.gif is animated .*3 frames"),
    ("grey.png", {}, r"grey.png is grayscale \(mode L\).*RGB"),
    ("small.png", {}, "small.png is 20x40, smaller than the 32x32"),
    ("big.png", {"resize": False}, "big.png is 64x48; this model takes 32x32 images and resizing is off"),
    ("dir.png", {}, "is a folder"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD)
def test_bad_images(demo_pipe, bad_files, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo_pipe.score(bad_files / name, "red circle", **kwargs)


@pytest.mark.parametrize(
    "images,match",
    [
        (np.zeros((32, 32), np.uint8), r"grayscale \(shape \(32, 32\)\)"),
        (np.zeros((32, 32, 4), np.uint8), r"a\[\.\.\., :3\]"),
        (np.zeros((32, 32, 3), np.float32), "float32 array; give 8-bit values"),
        ([], "at least one image"),
    ],
)
def test_bad_arrays(demo_pipe, images, match):
    with pytest.raises(ValueError, match=match):
        demo_pipe.score(images, "red circle")


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ("purple blob", {}, 'unknown prompt "purple blob": this model knows only these 12'),
        ([], {}, "at least one prompt"),
        ("red circle", {"noise_samples": -1}, "noise_samples must be a whole number from 0 to 64"),
        ("red circle", {"dequant_samples": 0}, "dequant_samples must be a whole number from 1 to 64"),
        ("red circle", {"dequant_samples": 10**9}, "dequant_samples must be a whole number from 1 to 64"),
        ("red circle", {"batch_size": 10**6}, "batch_size must be a whole number from 1 to 256"),
        ("red circle", {"dequant_samples": 2, "noise_samples": 1}, "not both"),
        ("red circle", {"dequant_noise": np.zeros((1, 32, 32, 3))}, r"dequant_noise must have shape \(2, 32, 32, 3\)"),
        ("red circle", {"dequant_noise": np.ones((2, 32, 32, 3))}, r"dequant_noise must be in \[0, 1\)"),
    ],
)
def test_bad_arguments(demo_pipe, prompts, kwargs, match):
    images = shapes.make_dataset(2, 1)[0]
    with pytest.raises(ValueError, match=match):
        demo_pipe.score(images, prompts, **kwargs)


def test_tarflow_prompts(tarflow):
    with pytest.raises(ValueError, match='unknown class "7"'):
        tarflow.score(np.zeros((tarflow.image_size(),) * 2 + (3,), np.uint8), "7")
    s = tarflow.image_size()
    r = tarflow.score(np.zeros((s, s, 3), np.uint8), "all", seed=0)
    assert r.prompts == [str(i) for i in range(tarflow.classes.num_classes)]


def test_unconditional_model_scores_the_empty_prompt():
    from test_flow import tiny_tarflow

    pipe = Pipeline(tiny_tarflow(num_classes=0))
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    noise = np.random.default_rng(1).random((2, 8, 8, 3))
    r = pipe.score(images, "", dequant_noise=noise)
    x = mx.array(((images + noise) / 256.0) * 2 - 1, dtype=mx.float32)
    np.testing.assert_allclose(r.bits_per_dim[:, 0], reference_bpd(pipe.flow, x, None, 128), rtol=1e-5)
    with pytest.raises(ValueError, match='this model is unconditional: its only prompt is ""'):
        pipe.score(images, "a cat")


# -- batches, progress, cancelling -----------------------------------------------------------


def test_batches_progress_and_cancel(demo_pipe):
    images = shapes.make_dataset(3, 2)[0]
    seen = []
    r = demo_pipe.score(
        images, ["red circle", "green square"], seed=1, batch_size=4, progress=lambda *a: seen.append(a)
    )
    whole = demo_pipe.score(images, ["red circle", "green square"], seed=1)
    np.testing.assert_allclose(r.bits_per_dim, whole.bits_per_dim, rtol=1e-6)
    assert seen[:2] == [("text", 0, 1), ("text", 1, 1)]
    assert [d for s, d, t in seen if s == "score"] == [0, 4, 6] and seen[-1] == ("score", 6, 6)
    with pytest.raises(Cancelled):
        demo_pipe.score(images, "all", seed=1, batch_size=4, progress=lambda s, d, t: s != "score" or d < 8)
    again = demo_pipe.score(images, ["red circle", "green square"], seed=1)  # still usable
    np.testing.assert_array_equal(again.bits_per_dim, whole.bits_per_dim)
    assert r.timings["score"] > 0 and r.peak_memory > 0


def test_score_stage_for_the_benchmark(demo_pipe):
    info = score_stage(demo_pipe.flow, demo_pipe.encode(["red circle"]), batch_size=3, repeats=2, warmup=0)
    assert info["batch"] == 3 and info["seconds"]["n"] == 2 and info["peak_memory"] > 0
    assert info["images_per_second"] == pytest.approx(3 / info["seconds"]["median"])


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (["--image", "{d}/missing.png", "--prompt", "all"], "missing.png: no such file"),
        (["--image", "{d}/text.png", "--prompt", "all"], "cannot read"),
        (["--image", "{d}/anim.gif", "--prompt", "all"], "animated"),
        (["--image", "{d}/grey.png", "--prompt", "all"], "grayscale"),
        (["--image", "{d}/small.png", "--prompt", "all"], "smaller than"),
        (["--image", "{d}/big.png", "--prompt", "all", "--no-resize"], "resizing is off"),
        (["--image", "{d}/big.png", "--prompt", "pink circle"], 'unknown prompt "pink circle"'),
        (["--image", "{d}/big.png", "--prompt"], "give at least one prompt"),
        (["--image", "--prompt", "all"], "give at least one image"),
        (
            ["--image", "{d}/big.png", "--prompt", "all", "--noise-samples", "-2"],
            "--noise-samples: noise_samples must be a whole number from 0 to 64",
        ),
    ],
)
def test_command_line_mistakes(bad_files, tmp_path, capsys, args, match):
    out = tmp_path / "scores.json"
    code = main(["--model", "demo", "--no-progress", *[a.format(d=bad_files) for a in args], "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and match in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_command_line_existing_json_is_kept(bad_files, tmp_path, capsys):
    out = tmp_path / "scores.json"
    out.write_text("{}")
    assert main(["--model", "demo", "--image", str(bad_files / "big.png"), "--prompt", "all", "--json", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_text() == "{}"


def test_command_line_says_what_it_resized(bad_files, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "--model",
                "demo",
                "--image",
                str(bad_files / "big.png"),
                "--prompt",
                "red square",
                "",
                "--noise-samples",
                "1",
                "--seed",
                "4",
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert f"{bad_files / 'big.png'} (64x48, resized and centre-cropped to 32x32)" in text
    assert "Gaussian noise at the training noise_std 0.1, 1 draw (seed 4)" in text
    r = json.loads(out.read_text())
    assert r["images"][0]["resized"] and r["images"][0]["size"] == [64, 48] and r["prompts"] == ["red square", ""]
    assert r["seed"] == 4 and r["samples"] == 1 and len(r["images"][0]["bits_per_dim"]) == 2


def test_zero_shot_classification_of_the_demo_shapes(tmp_path):
    """The shipped demo model names the class of images drawn by the procedural
    generator (not by the model) for >= 90% of 120 (10 per class), through the
    command line: `--prompt all`, most likely class by bits/dim."""
    images, labels = shapes.make_dataset(120, ZERO_SHOT_SEED)
    assert np.bincount(labels).tolist() == [10] * 12
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(im).save(paths[-1])
    out = tmp_path / "scores.json"
    env = dict(os.environ)
    if sys.platform.startswith("linux") and Path(openblas_path()).exists():
        env["LD_PRELOAD"] = openblas_path()  # the README's Linux setup: MLX's bundled BLAS is ~30x slower
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_starflow.score",
            "--model",
            "demo",
            "--prompt",
            "all",
            "--seed",
            "0",
            "--json",
            str(out),
            "--image",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    result = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".png"] == ["scores.json"]  # no temporary left
    assert result["prompts"] == list(shapes.PROMPTS) and result["space"] == "pixels" and result["seed"] == 0
    pred = np.array([shapes.PROMPTS.index(im["most_likely"]) for im in result["images"]])
    bpd = np.array([im["bits_per_dim"] for im in result["images"]])
    assert bpd.shape == (120, 12) and (pred == bpd.argmin(1)).all()
    confusion = np.zeros((12, 12), int)
    np.add.at(confusion, (labels, pred), 1)
    print("\nconfusion (rows: true class, columns: most likely)\n" + str(confusion))
    accuracy = (pred == labels).mean()
    assert accuracy >= 0.9, f"{accuracy:.1%}\n{confusion}"
    assert f"{paths[0]} (32x32)" in run.stdout and "most likely" in run.stdout
