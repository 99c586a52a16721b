"""The video demo: its procedural clips, the checker that judges clips from their
pixels (written apart from the drawing code), and the shipped model's samples."""

import numpy as np
import pytest

from mlx_starflow.demo_video import checker, clips

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
