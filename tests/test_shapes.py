import numpy as np
import pytest

from mlx_starflow.demo import shapes


def test_prompts():
    assert len(shapes.PROMPTS) == 12
    assert shapes.PROMPTS[0] == "red circle" and shapes.PROMPTS[11] == "yellow triangle"
    for i, p in enumerate(shapes.PROMPTS):
        assert shapes.prompt_to_class(p) == i
        assert shapes.class_to_prompt(i) == p
    assert shapes.prompt_to_class("  Blue   SQUARE ") == shapes.PROMPTS.index("blue square")


def test_unknown_prompt_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        shapes.prompt_to_class("purple hexagon")
    for p in shapes.PROMPTS:
        assert p in str(e.value)
    with pytest.raises(ValueError):
        shapes.class_to_prompt(12)


def test_dataset_reproducible_and_balanced():
    a, la = shapes.make_dataset(120, seed=3)
    b, lb = shapes.make_dataset(120, seed=3)
    c, _ = shapes.make_dataset(120, seed=4)
    assert a.shape == (120, 32, 32, 3) and a.dtype == np.uint8
    assert la.shape == (120,) and np.issubdtype(la.dtype, np.integer)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert np.bincount(la, minlength=12).tolist() == [10] * 12
    counts = np.bincount(shapes.make_dataset(50, seed=0)[1], minlength=12)
    assert counts.max() - counts.min() <= 1

    img = shapes.draw(0, np.random.default_rng(0), size=48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    # Anti-aliased: edge pixels take values between background and shape.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 5
    # The border is background only, so the shape lies fully inside.
    border = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], axis=1)
    assert border.min() > 200


def test_model_range_round_trip():
    images, _ = shapes.make_dataset(12, seed=1)
    x = shapes.to_model(images)
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_array_equal(shapes.from_model(x), images)
    assert shapes.from_model(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_checker_on_clean_and_noisy_images():
    images, labels = shapes.make_dataset(600, seed=123)
    clean = shapes.evaluate(images, labels)
    assert clean["colour_accuracy"] >= 0.98, shapes.format_report(clean)
    assert clean["shape_accuracy"] >= 0.95, shapes.format_report(clean)
    assert set(clean["per_class"]) == set(shapes.PROMPTS)

    rng = np.random.default_rng(0)
    noisy = np.clip(np.round(images + rng.normal(0, 10, images.shape)), 0, 255)
    noisy = shapes.evaluate(noisy.astype(np.uint8), labels)
    assert noisy["colour_accuracy"] >= 0.90, shapes.format_report(noisy)
    assert noisy["shape_accuracy"] >= 0.80, shapes.format_report(noisy)

    report = shapes.format_report(clean)
    assert "red circle" in report and "all" in report


def test_checker_rejects_non_shapes():
    rng = np.random.default_rng(0)
    blank = np.full((32, 32, 3), 230, np.uint8)
    assert shapes.classify(blank) == (None, None)
    # Scattered random pixels are no shape of any colour.
    for _ in range(20):
        img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
        assert shapes.classify(img) == (None, None)
    # A grey square has a shape but no colour.
    img = shapes.draw(shapes.prompt_to_class("red square"), rng)
    img[np.abs(img.astype(int) - img[0, 0]).sum(-1) > 60] = 90
    assert shapes.classify(img) == (None, "square")
