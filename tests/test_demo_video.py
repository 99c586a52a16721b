"""The video demo: its procedural clips, the checker that judges clips from their
pixels (written apart from the drawing code), and the shipped model's samples."""

import json
import time

import numpy as np
import pytest

from mlx_starflow import demo_video
from mlx_starflow.demo_video import checker, clips
from mlx_starflow.loading.resolve import resolve
from mlx_starflow.loading.video import load_video_flow

# The issue's bars: the prompted colour in >= 90% of frames, the prompted direction in
# >= 80% of clips. The shipped model measures 99.6% / 96.9% on 8 clips per prompt and
# 100% / 97.9% on this test's 48 clips (docs/demo.md).
ISSUE_COLOUR, ISSUE_DIRECTION = 0.9, 0.8

# -- the data set and the checker -------------------------------------------------------


@pytest.fixture(scope="module")
def drawn():
    x, y = clips.make_dataset(96, 7)  # two clips of every class
    return x, [clips.PROMPTS[i] for i in y]


def test_clips():
    x, y = clips.make_dataset(50, 3)
    assert x.shape == (50, clips.FRAMES, clips.SIZE, clips.SIZE, 3) and x.dtype == np.uint8
    assert np.bincount(y, minlength=48).max() - np.bincount(y, minlength=48).min() <= 1
    x2, y2 = clips.make_dataset(50, 3)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert len(clips.PROMPTS) == 48 and clips.PROMPTS[0] == "red circle moving right"
    assert clips.prompt_to_class("  Yellow TRIANGLE moving  down") == 47
    with pytest.raises(ValueError, match="moving"):
        clips.prompt_to_class("purple circle moving right")
    np.testing.assert_array_equal(clips.from_model(clips.to_model(x)), x)
    # Batches smaller than the 48 classes still cover them all (the first training run
    # drew only classes 0-31 in its batches of 32).
    seen = set()
    for seed in range(10):
        seen |= set(clips.make_dataset(32, seed)[1].tolist())
    assert seen == set(range(48))


def test_checker_on_drawn_clips(drawn):
    x, prompts = drawn
    r = checker.evaluate(x, prompts)
    assert r["frames"] == 96 * clips.FRAMES
    assert r["colour_accuracy"] == 1.0 and r["direction_accuracy"] == 1.0, checker.format_report(r)


def test_checker_with_noise(drawn):
    # Noise of about the size the model leaves behind does not fool it.
    x, prompts = drawn
    noisy = np.clip(x + np.random.default_rng(0).normal(0, 12, x.shape), 0, 255).astype(np.uint8)
    r = checker.evaluate(noisy, prompts)
    assert r["colour_accuracy"] >= 0.99 and r["direction_accuracy"] >= 0.97, checker.format_report(r)


def test_checker_is_not_fooled(drawn):
    x, prompts = drawn
    # Played backwards, every clip moves the other way.
    opposite = {"right": "left", "left": "right", "up": "down", "down": "up"}
    back = [" ".join(opposite.get(w, w) for w in p.split()) for p in prompts]
    assert checker.evaluate(x[:, ::-1], back)["direction_accuracy"] == 1.0
    assert checker.evaluate(x[:, ::-1], prompts)["direction_accuracy"] == 0.0
    # Transposed frames swap the axes: right <-> down, left <-> up.
    swap = {"right": "down", "down": "right", "left": "up", "up": "left"}
    transposed = [" ".join(swap.get(w, w) for w in p.split()) for p in prompts]
    assert checker.evaluate(x.transpose(0, 1, 3, 2, 4), transposed)["direction_accuracy"] == 1.0
    # A still clip has no direction; a plain one has neither colour nor direction.
    still = checker.judge(np.repeat(x[0, :1], clips.FRAMES, axis=0))
    assert still["direction"] is None and set(still["colours"]) == {prompts[0].split()[0]}
    plain = checker.judge(np.full((clips.FRAMES, 16, 16, 3), 230, np.uint8))
    assert plain["direction"] is None and set(plain["colours"]) == {None}
    # Another colour: channels rotated (R, G, B) <- (B, R, G): red -> green -> blue -> red.
    rot = {"red": "green", "green": "blue", "blue": "red"}
    idx = [i for i, p in enumerate(prompts) if not p.startswith("yellow")]
    r = checker.evaluate(x[idx][..., [2, 0, 1]], [" ".join(rot.get(w, w) for w in prompts[i].split()) for i in idx])
    assert r["colour_accuracy"] == 1.0
    with pytest.raises(ValueError, match="names no colour"):
        checker.evaluate(x[:1], ["a circle going right"])


def test_checker_is_apart_from_the_drawing():
    source = open(checker.__file__).read()
    assert "import clips" not in source and "from .clips" not in source and "from . import" not in source


# -- the shipped model ---------------------------------------------------------------------

PER_PROMPT = 1  # 48 clips, 384 frames


@pytest.fixture(scope="module")
def model():
    return load_video_flow(demo_video.DEMO_VIDEO_DIR)


def test_shipped_model(model):
    cfg, video = model.config, model.video
    assert cfg.class_names == list(clips.PROMPTS) and cfg.txt_size == 1 and cfg.txt_dim == 49
    assert cfg.vae is None and cfg.in_channels == 3 and cfg.input_size == clips.SIZE and cfg.patch_size == 4
    assert video.frames == clips.FRAMES and video.shallow_block_local
    s = cfg.sampling
    assert s["sampler"] == "sequential" and s["denoise"] == "score" and s["guidance"] > 0
    size = (demo_video.DEMO_VIDEO_DIR / "model.safetensors").stat().st_size
    assert size < 5e6  # a few MB
    training = json.loads((demo_video.DEMO_VIDEO_DIR / "training.json").read_text())
    # one run of the train command's defaults, from scratch (docs/demo.md: the recipe)
    assert [(st["seed"], st["init"], st["steps"]) for st in training["stages"]] == [(0, None, 3600)]


def test_resolve_names_the_shipped_model():
    r = resolve("demo-video")
    assert r.flow == demo_video.DEMO_VIDEO_DIR and r.text_encoder is None and r.vae is None


@pytest.fixture(scope="module")
def checked(model):
    d = demo_video.sampling_defaults(model)
    tic = time.perf_counter()
    r = demo_video.checker_accuracy(model, PER_PROMPT, guidance=d["guidance"])
    print(f"\n{48 * PER_PROMPT} clips in {time.perf_counter() - tic:.1f} s\n" + checker.format_report(r))
    return r


def test_samples_meet_the_issue_bars(checked):
    r = checked
    assert r["clips_uint8"].shape == (48 * PER_PROMPT, clips.FRAMES, clips.SIZE, clips.SIZE, 3)
    assert r["colour_accuracy"] >= ISSUE_COLOUR, checker.format_report(r)
    assert r["direction_accuracy"] >= ISSUE_DIRECTION, checker.format_report(r)


def test_sampling_is_reproducible(model):
    a = demo_video.sample(model, [0, 29], guidance=1.0, seed=5)
    b = demo_video.sample(model, [0, 29], guidance=1.0, seed=5)
    np.testing.assert_array_equal(a, b)
    c = demo_video.sample(model, [0, 29], guidance=1.0, seed=6)
    assert not np.array_equal(a, c)


def test_training_runs():
    cfg, video = demo_video.demo_config(channels=32, head_dim=32, layers=(1, 1))
    _, losses = demo_video.train(cfg, video, steps=2, batch_size=2, log=None)
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_train_command(tmp_path, capsys):
    tiny = ["--channels", "32", "--head-dim", "32", "--layers", "1 1", "--expansion", "1", "--batch-size", "2"]
    fast = ["--steps", "2", "--warmup", "1", "--guidance", "1", "--select-per-class", "1"]
    demo_video.main(["train", "--out", str(tmp_path / "a"), *tiny, *fast])
    demo_video.main(["train", "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a"), *fast, "--seed", "1"])
    assert "clips/s" in capsys.readouterr().out
    stages = json.loads((tmp_path / "b" / "training.json").read_text())["stages"]
    assert [st["seed"] for st in stages] == [0, 1] and stages[1]["init"] == str(tmp_path / "a")
    model = load_video_flow(tmp_path / "b")
    assert model.video.frames == clips.FRAMES and model.config.sampling["guidance"] == 1.0
