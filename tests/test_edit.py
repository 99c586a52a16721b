"""Editing by exact inversion (mlx_starflow/edit.py): through the Pipeline API on a tiny
release in the original formats (T5 text, SD-style VAE) and on the bundled demo model,
and through `python -m mlx_starflow.edit`."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tiny_release import make_release

from mlx_starflow.demo import shapes
from mlx_starflow.editing import blend, load_mask
from mlx_starflow.images import from_pil, read_metadata
from mlx_starflow.pipeline import Cancelled, Pipeline
from mlx_starflow.tools.benchmark import invert_stage


def rel(a, b):
    a, b = np.array(a), np.array(b)
    return np.abs(a - b).max() / np.abs(b).max()


def rel_norm(a, b):
    a, b = np.array(a), np.array(b)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    make_release(root)  # 16x16 images, 8x8x4 latents, a 2x VAE
    # The random encoder's latents are ~0.1 with SD's 0.18215; scaled to about unit size,
    # as the real VAE's scaled latents are, so an image's latents are in the flow's range
    # (far smaller ones are out of this untrained flow's range: x = z s + mu cancels).
    cfg = root / "vae" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "scaling_factor": 2.0}))
    return root


@pytest.fixture(scope="module")
def pipe(release, cache):
    return Pipeline.from_pretrained(str(release))


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def red(demo):
    """Generated red circles (the demo's own sampling, seed 100...) and their centroids."""
    r = demo.generate("red circle", num_images=4, seed=100)
    assert all(shapes.classify(np.asarray(im)) == ("red", "circle") for im in r.images)
    return r


def centroid(image):
    """Centre of mass (x, y) in pixels of the shape: pixels more than half way from the
    background colour to the foreground colour the checker finds."""
    a = np.asarray(image, dtype=np.float32)
    f = shapes.features(a)
    axis = f["foreground"] - f["background"]
    t = np.clip((a - f["background"]) @ axis / float(axis @ axis), 0, 1)
    t = np.where(t > 0.5, t, 0.0)
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]] + 0.5
    return np.array([(t * xx).sum(), (t * yy).sum()]) / t.sum()


# -- exact inversion through the Pipeline API ---------------------------------------------


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_generate_inverts_pipe_invert_text_model(pipe, w):
    x = mx.array(np.random.default_rng(3).normal(size=(2, 8, 8, 4)).astype(np.float32))
    z = pipe.invert("a red fox", latents=x, guidance=w)
    assert z.shape == x.shape
    back = pipe.generate("a red fox", num_images=2, latents=z, guidance=w, sampler="sequential", denoise="none")
    assert rel(back.latents, x) < 1e-4
    # and the other way: the noise generate started from comes back
    again = pipe.invert("a red fox", latents=back.latents, guidance=w)
    assert rel(again, z) < 1e-4


@pytest.mark.parametrize("w", [1.0, 3.6])
def test_generate_inverts_pipe_invert_demo(demo, red, w):
    x = red.latents
    z = demo.invert("red circle", latents=x, guidance=w)
    back = demo.generate("red circle", num_images=4, latents=z, guidance=w, sampler="sequential", denoise="none")
    # Float32 rounding (cached token steps against one causal pass) is carried along the
    # autoregressive chain and grows with guidance: on 24 demo samples the relative norm
    # error is 9e-6 at w = 1 (the demo's default) and 4e-5 at w = 3.6, the largest single
    # error 2.6e-4 and 1.7e-3 of the largest value (docs/demo.md).
    assert rel_norm(back.latents, x) < 1e-4


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="module")
def reference_models(tmp_path_factory):
    """The parity fixtures' reference checkpoints, converted and loaded as a user's are."""
    from mlx_starflow.loading.weights import convert_starflow, convert_tarflow, load_flow

    if not FIXTURES.is_dir():
        pytest.skip(f"no reference fixtures at {FIXTURES} (tests/test_parity.py runs them under CI)")
    models = {}
    for name in ("t2i_tiny", "tarflow_tiny"):
        out = tmp_path_factory.mktemp(name) / "model"
        if name.startswith("tarflow"):
            convert_tarflow(FIXTURES / name / "model.pth", out, noise_std=0.07)
        else:
            convert_starflow(FIXTURES / name / "model.pth", FIXTURES / name / "config.yaml", out)
        models[name] = (load_flow(out), dict(np.load(FIXTURES / name / "inputs.npz")))  # inputs only
    return models


@pytest.mark.parametrize("name", ["t2i_tiny", "tarflow_tiny"])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.6])
def test_reference_fixture_models_round_trip(reference_models, name, w):
    # STARFlow with text (SOS, L2R; the shallow blocks alternate direction) and TarFlow
    # with classes (no SOS, linear guidance); R2L and the Gemma style: tests/test_sample.py.
    from mlx_starflow.sample import invert, sample

    flow, inputs = reference_models[name]
    nhwc = lambda a: mx.array(a).transpose(0, 2, 3, 1)  # noqa: E731
    x, noise = nhwc(inputs["x"]), nhwc(inputs["noise"])
    if name.startswith("tarflow"):
        y = mx.array(inputs["labels"].astype(np.int64))
    else:
        y = mx.array(inputs["y_cfg"] if w > 0 else inputs["y"])
    assert rel(sample(flow, invert(flow, x, y, w), y, w), x) < 1e-4
    assert rel(invert(flow, sample(flow, noise, y, w), y, w), noise) < 1e-4


def test_default_guidance_is_generates(demo, red):
    # guidance None means the model's own default on both sides (the demo's is 1.0)
    z = demo.invert("red circle", latents=red.latents[:1])
    np.testing.assert_allclose(np.array(z), np.array(demo.invert("red circle", latents=red.latents[:1], guidance=1.0)))


def test_tarflow_pipeline_round_trip():
    from test_flow import tiny_tarflow

    pipe = Pipeline(tiny_tarflow())  # class ids as prompts, linear guidance
    x = mx.array(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 8, 8, 3)).astype(np.float32))
    z = pipe.invert(["2", "0"], latents=x, guidance=1.5)
    back = pipe.generate(["2", "0"], latents=z, guidance=1.5, sampler="sequential", denoise="none")
    assert rel(back.latents, x) < 1e-4


def test_invert_an_image_is_inverting_its_encoding(pipe):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    z = pipe.invert("a cat", image=img, guidance=1.0)
    x = pipe.encode_images(from_pil(img, size=16, factor=2))
    np.testing.assert_allclose(np.array(z), np.array(pipe.invert("a cat", latents=x, guidance=1.0)), atol=1e-6)
    with pytest.raises(ValueError, match="either image= or latents="):
        pipe.invert("a cat")


def test_jacobi_round_trip_error_follows_its_threshold(pipe):
    # Jacobi stops a chunk when an iteration changes it by less than the threshold (a
    # relative mean square), so the round trip is off by about sqrt(threshold) in relative
    # norm (measured: 0.28, 0.034, 2.6e-4 at 1e-2, 1e-4, 1e-8). A chunk of n tokens is
    # exact after n iterations, so threshold 0 with max_iter = block size is exact.
    x = mx.array(np.random.default_rng(5).normal(size=(1, 8, 8, 4)).astype(np.float32))
    z = pipe.invert("a dog", latents=x, guidance=2.0)
    errors = []
    for t, iters in ((1e-2, 64), (1e-4, 64), (1e-8, 64), (0.0, 16)):
        out = pipe.generate(
            "a dog",
            latents=z,
            guidance=2.0,
            sampler="jacobi",
            jacobi_block_size=16,
            jacobi_threshold=t,
            jacobi_max_iter=iters,
            denoise="none",
        ).latents
        errors.append(rel_norm(out, x))
        assert errors[-1] < max(5 * t**0.5, 1e-4), (t, errors)
    assert errors[0] > errors[1] > errors[2] > errors[3], errors


# -- strength and masks ------------------------------------------------------------------


def test_blend_is_variance_preserving():
    z, e = mx.random.normal((200000,), key=mx.random.key(0)), mx.random.normal((200000,), key=mx.random.key(1))
    for s in (0.0, 0.3, 0.7, 1.0):
        assert abs(float(mx.std(blend(z, e, s))) - 1.0) < 0.01
    assert blend(z, e, 0.0) is z and blend(z, e, 1.0) is e


def test_strength_zero_with_the_source_prompt_reproduces_the_latents(pipe, demo, red):
    # STARFlow: the image's latents come back (compared in latent space, no denoising)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    r = pipe.edit(img, "a cat", source_prompt="a cat", strength=0.0, guidance=2.0, sampler="sequential", denoise="none")
    assert rel(r.latents, pipe.encode_images(from_pil(img, size=16, factor=2))) < 1e-4
    # pixel model: the image's own pixels
    r = demo.edit(red.images, "red circle", source_prompt="red circle", strength=0.0, num_images=4, denoise="none")
    assert rel(r.latents, from_pil(red.images)) < 1e-4


def test_strength_one_ignores_the_image(demo, red):
    a = demo.edit(red.images[0], "blue circle", source_prompt="red circle", strength=1.0, seed=9, denoise="none")
    b = demo.edit(red.images[1], "blue circle", strength=1.0, seed=9, denoise="none")
    fresh = demo.generate("blue circle", seed=9, denoise="none")
    np.testing.assert_array_equal(np.array(a.latents), np.array(fresh.latents))
    np.testing.assert_array_equal(np.array(b.latents), np.array(fresh.latents))
    assert a.seeds == [9] and a.params["strength"] == 1.0


@pytest.mark.parametrize("denoise", ["none", "score"])
def test_masked_edit_keeps_the_rest_bit_identical(demo, red, denoise):
    mask = np.zeros((32, 32), bool)
    mask[8:20, 4:28] = True  # token rows 2..4 (4x4 pixel tokens)
    src = from_pil(red.images[0])  # the pixel model's latents are the image's pixels
    r = demo.edit(
        red.images[0], "blue circle", source_prompt="red circle", strength=0.8, seed=1, mask=mask, denoise=denoise
    )
    out, x = np.array(r.latents[0]), np.array(src[0])
    np.testing.assert_array_equal(out[~mask], x[~mask])
    assert np.abs(out[mask] - x[mask]).max() > 0.1
    assert r.params["mask_sha256"] == hashlib.sha256(mask.tobytes()).hexdigest()


def test_an_all_white_mask_is_no_mask(demo, red):
    # the masked path finishes the stages itself: it must agree with the pipeline's own
    kw = dict(source_prompt="red circle", strength=0.5, seed=4)
    a = demo.edit(red.images[0], "green circle", **kw)
    with pytest.warns(UserWarning, match="mask is 64x64, its image 32x32: resized"):
        b = demo.edit(red.images[0], "green circle", mask=np.ones((64, 64)), **kw)
    np.testing.assert_allclose(np.array(b.latents), np.array(a.latents), atol=1e-6)
    assert {k: v for k, v in b.params.items() if k != "mask_sha256"} == a.params
    assert b.seeds == a.seeds == [4] and set(b.timings) == set(a.timings)


def test_masked_edit_text_model_with_its_defaults(pipe):
    # the release's own defaults: Jacobi, guidance 3.6, the score step; a VAE in between
    img = Image.fromarray(np.random.default_rng(6).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), bool)
    mask[:8] = True  # the top half: latent rows 0..3
    kw = dict(source_prompt="a cat", strength=0.5, seed=2)
    r = pipe.edit(img, "a dog", mask=mask, **kw)
    x = np.array(pipe.encode_images(from_pil(img, size=16, factor=2)))
    out = np.array(r.latents)
    np.testing.assert_array_equal(out[:, 4:], x[:, 4:])
    assert np.abs(out[:, :4] - x[:, :4]).max() > 1e-3
    plain = pipe.edit(img, "a dog", **kw)
    assert {k: v for k, v in r.params.items() if k != "mask_sha256"} == plain.params
    assert r.params["sampler"] == "jacobi" and r.params["jacobi_block_size"] == 16 and r.params["denoise"] == "score"


def test_mask_tokens_resizing_and_rules(demo, red):
    sizes = [(32, 32)]
    m = np.zeros((32, 32), np.uint8)
    m[5, 9] = 255  # one white pixel: its whole 4x4 token may change
    keep, notes = load_mask(Image.fromarray(m), sizes, (32, 32), demo)
    k = np.array(keep[0, ..., 0])
    assert k.sum() == 16 and k[4:8, 8:12].all() and notes == []
    big = np.zeros((64, 64), np.uint8)
    big[:32] = 255  # top half, at twice the size
    keep, notes = load_mask(Image.fromarray(big), sizes, (32, 32), demo)
    assert "64x64" in notes[0] and "resized" in notes[0]
    k = np.array(keep[0, ..., 0])
    assert k[:16].all() and not k[16:].any()
    # an RGB black and white mask with soft edges is a mask
    soft = np.zeros((32, 32, 3), np.uint8)
    soft[:, 16:] = 255
    soft[:, 15] = 128
    assert np.array(load_mask(Image.fromarray(soft), sizes, (32, 32), demo)[0][0, :, 12:, 0]).all()
    # a source image of another size: the mask is resized and cropped as the image is
    wide = np.zeros((32, 64), np.uint8)
    wide[:, 32:] = 255  # the right half of a 64x32 image; its centre crop keeps columns 16..47
    keep, notes = load_mask(Image.fromarray(wide), [(64, 32)], (32, 32), demo)
    k = np.array(keep[0, ..., 0])
    assert notes == [] and k[:, 16:].all() and not k[:, :16].any()


# -- what the demo makes of it --------------------------------------------------------------


def test_red_circle_becomes_blue_in_place(demo, red):
    r = demo.edit(red.images, "blue circle", source_prompt="red circle", strength=0.3, seed=7, num_images=4)
    shifts = []
    for before, after in zip(red.images, r.images):
        assert shapes.classify(np.asarray(after)) == ("blue", "circle")
        shifts.append(np.linalg.norm(centroid(after) - centroid(before)))
    assert np.median(shifts) < 2.0 and max(shifts) < 4.0, shifts


HUES = {"red": 0.0, "yellow": 60.0, "green": 120.0, "blue": 240.0}


def region_colour(image, region):
    """The colour name nearest the mean hue (weighted by saturation) of the region's
    pixels that differ from the background (the median of the image's border), or None
    when fewer than 8 do. Apart from the demo's own checker on purpose."""
    a = np.asarray(image, np.float32) / 255.0
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    px = a[region]
    fg = px[np.linalg.norm(px - np.median(border, axis=0), axis=1) > 0.3]
    if len(fg) < 8:
        return None
    hsv = np.asarray(Image.fromarray((fg[None] * 255).astype(np.uint8)).convert("HSV"), np.float32)[0]
    angle, weight = hsv[:, 0] / 255.0 * 2 * np.pi, hsv[:, 1] / 255.0
    hue = np.degrees(np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum())) % 360
    return min(HUES, key=lambda k: min(abs(hue - HUES[k]), 360 - abs(hue - HUES[k])))


@pytest.fixture(scope="module")
def halves(demo):
    """30 masked edits' sources: 15 red circles, each with the left and the top half free."""
    r = demo.generate("red circle", num_images=20, seed=200)
    keep = [i for i, im in enumerate(r.images) if shapes.classify(np.asarray(im)) == ("red", "circle")][:15]
    assert len(keep) == 15
    images = [r.images[i] for i in keep] * 2
    masks = np.zeros((30, 32, 32), bool)
    masks[:15, :, :16] = True
    masks[15:, :16] = True
    return images, masks


def masked_edits(demo, images, masks, prompt, **kw):
    """One edit per (image, mask) pair: (latents (B, 32, 32, 3), images)."""
    latents, out = [], []
    for mask in np.unique(masks, axis=0):
        idx = [i for i in range(len(masks)) if (masks[i] == mask).all()]
        r = demo.edit(
            [images[i] for i in idx], prompt, source_prompt="red circle", mask=mask, num_images=len(idx), **kw
        )
        latents += [(i, np.array(r.latents[k])) for k, i in enumerate(idx)]
        out += [(i, im) for k, (i, im) in enumerate(zip(idx, r.images))]
    return np.stack([a for _, a in sorted(latents, key=lambda t: t[0])]), [
        im for _, im in sorted(out, key=lambda t: t[0])
    ]


def test_masked_edit_paints_the_new_colour_and_keeps_the_rest(demo, halves):
    # Measured: 30 of 30 blue at strength 1; pasting before the score step (the old
    # code) left coloured noise in the region, teacher forcing 16-24 of 30 blue.
    images, masks = halves
    x = np.array(from_pil(images))
    latents, edited = masked_edits(demo, images, masks, "blue circle", strength=1.0, seed=7)
    colours = [region_colour(im, m) for im, m in zip(edited, masks)]
    assert sum(c == "blue" for c in colours) >= 27, colours
    for out, src, m in zip(latents, x, masks):
        np.testing.assert_array_equal(out[~m], src[~m])  # the kept half, bit for bit
        # clean: no values far outside the image range (noise), in the region it drew
        assert (np.abs(out[m]) > 1.1).mean() < 0.01


def test_masked_edit_at_strength_zero_returns_the_source(demo, halves):
    # under the source prompt, without the score step: the round trip, in the region too
    images, masks = halves
    x = np.array(from_pil(images))
    latents, _ = masked_edits(
        demo, images[:15:3] + images[15::3], masks[::3], "red circle", strength=0.0, denoise="none"
    )
    for out, src in zip(latents, x[::3]):
        assert rel_norm(out, src) < 1e-4


# -- progress, cancelling, bad input ---------------------------------------------------------


def test_progress_and_cancel(demo, red):
    seen = []
    demo.edit(red.images[0], "blue circle", seed=1, progress=lambda s, d, t: seen.append(s))
    assert list(dict.fromkeys(seen)) == ["encode", "invert", "text", "deep", "shallow", "denoise", "decode"]
    with pytest.raises(Cancelled):
        demo.edit(red.images[0], "blue circle", seed=1, mask=np.ones((32, 32)), progress=lambda s, d, t: s != "deep")
    assert demo.invert("red circle", latents=red.latents[:1]).shape == (1, 32, 32, 3)  # still usable


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strength=1.5), r"strength must be a number in \[0, 1\]"),
        (dict(strength=-0.1), r"strength must be a number in \[0, 1\]"),
        (dict(strength=float("nan")), r"strength must be a number in \[0, 1\]"),
        (dict(strength="a lot"), r"strength must be a number in \[0, 1\]"),
        (dict(mask=np.random.default_rng(0).uniform(size=(32, 32))), "not a mask: .* neither black nor white"),
        (dict(prompt="purple circle"), "unknown prompt"),
        (dict(source_prompt="purple circle"), "unknown prompt"),
        (dict(image=Image.new("L", (32, 32))), "is grayscale"),
        (dict(image=np.zeros((32, 32, 3), np.float32)), "float32 array; give 8-bit values"),
        (dict(image=Image.new("RGB", (16, 16))), "smaller than the 32x32"),
        (dict(image=3), "must be a path, PIL image, uint8 array"),
        (dict(mask="/no/such/mask.png"), "no such file"),
    ],
)
def test_bad_input_fails_before_work(demo, red, kwargs, match):
    kw = {"image": red.images[0], "prompt": "blue circle", **kwargs}
    calls = []
    with pytest.raises(ValueError, match=match) as error:
        demo.edit(kw.pop("image"), kw.pop("prompt"), progress=lambda *a: calls.append(a), **kw)
    assert calls == []
    assert "scor" not in str(error.value)  # an edit's errors speak of editing, not of scoring


def test_unknown_options_and_latents_are_refused(demo, red):
    with pytest.raises(TypeError, match="unknown edit option.*strenght"):
        demo.edit(red.images[0], "blue circle", strenght=0.5)
    with pytest.raises(TypeError, match="unknown edit option.*latents"):
        demo.edit(red.images[0], "blue circle", latents=red.latents[:1])


def test_invert_stage_times_the_inversion(demo):
    y = demo.conditioning(["red circle"] * 2, "", True)[0]
    out = invert_stage(demo.flow, y, 1.0, batch=2, repeats=2, warmup=0)
    assert out["seconds"]["n"] == 2 and out["tokens"] == 64 and out["blocks"] == 4
    assert out["tokens_per_second"] > 0 and out["peak_memory"] > 0


# -- the command line --------------------------------------------------------------------------


def cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mlx_starflow.edit", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def red_png(red, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "red.png"
    red.images[0].save(path)
    return path


def test_command_line_edit(red_png, tmp_path):
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[8:56, 8:56] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "blue-{seed}.png"
    r = cli(
        "--model",
        "demo",
        "--image",
        str(red_png),
        "--source-prompt",
        "red circle",
        "--prompt",
        "blue circle",
        "--strength",
        "0.3",
        "--seed",
        "5",
        "--mask",
        str(mask),
        "--output",
        str(out),
        "--verbose",
    )
    assert r.returncode == 0, r.stderr
    written = tmp_path / "blue-5.png"
    assert r.stdout.split() == [str(written)]
    assert "note: mask" in r.stderr and "64x64" in r.stderr and "resized" in r.stderr
    meta = read_metadata(written)
    assert meta["source_sha256"] == hashlib.sha256(red_png.read_bytes()).hexdigest()
    assert meta["source_file"] == "red.png" and meta["mask_file"] == "mask.png"
    assert meta["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert meta["prompt"] == "blue circle" and meta["source_prompt"] == "red circle"
    assert meta["strength"] == 0.3 and meta["seed"] == 5 and meta["operation"] == "edit"
    assert meta["guidance"] == 1.0 and meta["model"] == "demo"
    assert shapes.classify(np.asarray(Image.open(written).convert("RGB")))[0] == "blue"
    # the PNG's parameters make the same edit again
    again = cli(
        "--from-image",
        str(written),
        "--model",
        "demo",
        "--image",
        str(red_png),
        "--mask",
        str(mask),
        "--output",
        str(tmp_path / "again.png"),
    )
    assert again.returncode == 0, again.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(written)))


@pytest.mark.parametrize(
    "make,args,match",
    [
        (None, ["--strength", "1.5"], "strength must be a number in [0, 1]"),
        ("junk", [], "cannot read"),
        ("gif", [], "animated or has several pages (2 frames)"),
        ("missing", [], "no such file"),
        ("noise_mask", [], "is not a mask"),
    ],
)
def test_command_line_mistakes(red_png, tmp_path, make, args, match):
    image, extra = red_png, []
    if make == "junk":
        image = tmp_path / "junk.png"
        image.write_bytes(b"not a png at all")
    elif make == "gif":
        image = tmp_path / "anim.gif"
        frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
        frames[0].save(image, save_all=True, append_images=frames[1:])
    elif make == "missing":
        image = tmp_path / "nothing.png"
    elif make == "noise_mask":
        noise = tmp_path / "noise.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(noise)
        extra = ["--mask", str(noise)]
    out = tmp_path / "out"
    out.mkdir()
    r = cli(
        "--model",
        "demo",
        "--image",
        str(image),
        "--prompt",
        "blue circle",
        "--output",
        str(out / "x.png"),
        *extra,
        *args,
    )
    assert r.returncode == 1 and match in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr and "scor" not in r.stderr
    assert not list(out.iterdir())


def test_generate_init_image_is_a_variation(red_png, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "var.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_starflow.generate",
            "--model",
            "demo",
            "--prompt",
            "red circle",
            "--init-image",
            str(red_png),
            "--strength",
            "0",
            "--denoise",
            "none",
            "--output",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    meta = read_metadata(out)
    assert meta["operation"] == "variation" and meta["source_prompt"] == "red circle" and meta["strength"] == 0.0
    # strength 0 under its own prompt, no denoising: the image itself, to 8-bit rounding
    diff = np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(Image.open(red_png), np.int16))
    assert diff.max() <= 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_starflow.generate",
            "--model",
            "demo",
            "--prompt",
            "red circle",
            "--strength",
            "0.5",
            "--output",
            str(tmp_path / "no.png"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "--init-image: give the image" in bad.stderr and not (tmp_path / "no.png").exists()
