"""Procedural shapes: the demo model's data set and the checker that judges its samples.

Each image is 32x32 RGB: one shape (circle, square, triangle) in one colour
(red, green, blue, yellow) on a light background, with random size and
position. The twelve classes are the prompts "<colour> <shape>", colour-major:

    0 red circle     1 red square     2 red triangle
    3 green circle   4 green square   5 green triangle
    6 blue circle    7 blue square    8 blue triangle
    9 yellow circle 10 yellow square 11 yellow triangle

Squares are axis-aligned and triangles are upright and equilateral (apex at
the top): a toy model learns a fixed orientation quickly, and the checker's
shape features do not rely on it anyway.

The checker (`classify`) needs only numpy: it finds the foreground as the
largest connected blob far from the border's colour, names its colour by hue
and its shape by how much of its bounding box it fills and whether it fills
the box's corners.
"""

import colorsys
import math

import numpy as np

from ..demo_common.drawing import draw_shape, jittered_colours
from ..demo_common.drawing import from_model as from_model
from ..demo_common.drawing import to_model as to_model

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 30),
}
SHAPES = ("circle", "square", "triangle")
PROMPTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# Hue (degrees) the checker expects for each colour; the nearest one wins.
_HUES = {"red": 0.0, "yellow": 50.0, "green": 125.0, "blue": 225.0}

# Drawing (demo_common.drawing): 4x supersampling, then a box filter, which is exact area coverage.
_MIN_SCALE, _MAX_SCALE = 0.35, 0.75
_MARGIN = 1.0  # pixels kept free at the border so it shows only background
_MIN_AREA = 16 / 1024  # checker: smallest foreground, as a fraction of the image


def prompt_to_class(prompt: str) -> int:
    """Class index of a prompt like "Red  Circle"; ValueError names the valid ones."""
    key = " ".join(str(prompt).lower().split())
    if key in PROMPTS:
        return PROMPTS.index(key)
    valid = ", ".join(f'"{p}"' for p in PROMPTS)
    raise ValueError(f"Unknown prompt {prompt!r}. The demo model knows these twelve: {valid}.")


def class_to_prompt(i: int) -> str:
    if not 0 <= int(i) < len(PROMPTS):
        raise ValueError(f"Class index must be in [0, {len(PROMPTS)}), got {i}.")
    return PROMPTS[int(i)]


def _split(cls: int):
    prompt = class_to_prompt(cls)
    colour, shape = prompt.split()
    return colour, shape


def draw(cls: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One anti-aliased (size, size, 3) uint8 image of class `cls`."""
    colour, shape = _split(cls)

    # Off-white background, mildly jittered colour (demo_common.drawing.jittered_colours).
    bg, fg = jittered_colours(rng, COLOURS[colour])

    s = rng.uniform(_MIN_SCALE, _MAX_SCALE) * size
    w = s
    h = s * math.sqrt(3) / 2 if shape == "triangle" else s
    x0 = rng.uniform(_MARGIN, size - _MARGIN - w)
    y0 = rng.uniform(_MARGIN, size - _MARGIN - h)
    return draw_shape(shape, fg, bg, x0, y0, w, h, size)


def make_dataset(n: int, seed: int, size: int = 32):
    """`n` images and labels from one seed; class counts differ by at most one."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(PROMPTS))
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i] = draw(int(c), rng, size)
    return images, labels.astype(np.int64)


# ---------------------------------------------------------------- checker


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask, by min-label propagation."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, labels):
            break
        labels = nb
    ids, counts = np.unique(labels[mask], return_counts=True)
    if len(ids) == 0:
        return mask
    return labels == ids[np.argmax(counts)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    out = mask.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def features(image: np.ndarray) -> dict:
    """The quantities `classify` decides on; None when no foreground is found.

    fill: foreground area over the area of its bounding box (circle pi/4,
      square 1, triangle 1/2), both measured with soft coverage so that
      anti-aliased edges count fractionally.
    corners: mean coverage of the four bounding-box corner patches that an
      inscribed ellipse leaves empty (circle ~0, square ~1, an upright
      triangle fills its two base corners partly); sorted by `classify`, so
      any orientation of a shape in steps of 90 degrees looks the same.
    aspect: longer over shorter side of the bounding box.
    """
    img = np.asarray(image, dtype=np.float32)[..., :3]
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)

    # Threshold well above the border's own spread so noise is not foreground
    # (3.5x the median is ~5 sigma of Gaussian noise), but never above half the
    # strongest contrast, or a faint shape would vanish.
    bdist = np.linalg.norm(border - bg, axis=-1)
    thresh = max(40.0, min(3.5 * np.median(bdist), 0.5 * dist.max()))
    mask = dist > thresh
    # Opening cuts off speckles and thin bridges before picking the largest blob.
    opened = _dilate(_erode(mask)) & mask
    mask = _largest_component(opened if opened.sum() >= 4 else mask)
    if mask.sum() < 4:
        return None

    # Foreground colour from the blob's core, away from blended edges.
    core = _erode(mask)
    if core.sum() < 3:
        core = mask
    fg = np.median(img[core], axis=0)
    r, g, b = np.clip(fg, 0, 255) / 255.0
    hue, _, sat = colorsys.rgb_to_hls(r, g, b)

    # Soft coverage: projection of each pixel onto the background->foreground line.
    axis = fg - bg
    norm2 = max(float(axis @ axis), 1e-6)
    t = (img - bg) @ axis / norm2
    # Pixels off that line (speckles of another colour) are not this shape.
    off = np.linalg.norm(img - bg - t[..., None] * axis, axis=-1)
    alpha = np.clip(t, 0.0, 1.0)
    alpha = np.where(_dilate(_dilate(mask)) & (off < 0.35 * np.sqrt(norm2)), alpha, 0.0)
    area = alpha.sum()
    # The smallest drawn shape covers ~50 pixels at 32x32; a few stray pixels
    # are not a shape.
    if area < _MIN_AREA * h * w:
        return None
    bw = alpha.max(axis=0).sum()  # width: fractional edge columns count in part
    bh = alpha.max(axis=1).sum()
    fill = area / max(bw * bh, 1e-6)

    # Box centre from the columns and rows more than half covered.
    cols = np.nonzero(alpha.max(axis=0) > 0.5)[0]
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    if len(cols) < 2 or len(rows) < 2:
        return None
    cx = (cols[0] + cols[-1] + 1) / 2.0
    cy = (rows[0] + rows[-1] + 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    u = (xx - cx) / (bw / 2.0)
    v = (yy - cy) / (bh / 2.0)
    # Corner patches: inside the box, clearly outside its inscribed ellipse.
    patch = (np.abs(u) < 1.0) & (np.abs(v) < 1.0) & (u * u + v * v > 1.1)
    quads = [patch & (u < 0) & (v < 0), patch & (u > 0) & (v < 0), patch & (u < 0) & (v > 0), patch & (u > 0) & (v > 0)]
    corner = [float(alpha[q].mean()) if q.any() else 0.0 for q in quads]

    return {
        "background": bg,
        "foreground": fg,
        "hue": hue * 360.0,
        "saturation": sat,
        "area": float(area),
        "fill": float(fill),
        "aspect": float(max(bw, bh) / max(min(bw, bh), 1e-6)),
        "corners": corner,
    }


def _colour_of(f: dict):
    # Washed-out or grey blobs have no meaningful hue.
    if f["saturation"] < 0.25:
        return None
    hue = f["hue"]
    gap = {c: min(abs(hue - ref), 360.0 - abs(hue - ref)) for c, ref in _HUES.items()}
    return min(gap, key=gap.get)


# (fill, mean of the two fullest corners, mean of the two emptiest corners)
_PROTOTYPES = {
    "circle": (np.pi / 4, 0.05, 0.0),
    "square": (1.0, 0.9, 0.8),
    "triangle": (0.55, 0.75, 0.0),
}
_SCALES = (0.1, 0.3, 0.3)
_MAX_SHAPE_DIST = 8.0
_MAX_ASPECT = 1.5


def _shape_of(f: dict):
    c = sorted(f["corners"])
    x = (f["fill"], (c[2] + c[3]) / 2, (c[0] + c[1]) / 2)
    dist = {s: sum(((a - b) / w) ** 2 for a, b, w in zip(x, p, _SCALES)) for s, p in _PROTOTYPES.items()}
    # Every drawn shape is about as tall as wide; a long bar is none of them.
    if f["aspect"] > _MAX_ASPECT:
        return None
    best = min(dist, key=dist.get)
    # Blobs unlike all three (ragged, hollow, smeared) get no shape.
    return best if dist[best] < _MAX_SHAPE_DIST else None


def classify(image: np.ndarray):
    """(colour or None, shape or None) of one HxWx3 uint8 image."""
    f = features(image)
    if f is None:
        return None, None
    return _colour_of(f), _shape_of(f)


def evaluate(images, labels) -> dict:
    """Checker accuracy over `images` whose true classes are `labels` (ints or prompts)."""
    labels = [prompt_to_class(c) if isinstance(c, str) else int(c) for c in labels]
    per = {p: {"n": 0, "colour": 0, "shape": 0, "both": 0} for p in PROMPTS}
    predictions = []
    for img, c in zip(images, labels):
        colour, shape = classify(np.asarray(img))
        want_colour, want_shape = _split(c)
        row = per[PROMPTS[c]]
        row["n"] += 1
        row["colour"] += colour == want_colour
        row["shape"] += shape == want_shape
        row["both"] += colour == want_colour and shape == want_shape
        predictions.append((colour, shape))

    n = max(len(labels), 1)
    result = {
        "n": len(labels),
        "colour_accuracy": sum(r["colour"] for r in per.values()) / n,
        "shape_accuracy": sum(r["shape"] for r in per.values()) / n,
        "accuracy": sum(r["both"] for r in per.values()) / n,
        "per_class": {},
        "predictions": predictions,
    }
    for p, r in per.items():
        if r["n"]:
            result["per_class"][p] = {
                "n": r["n"],
                "colour_accuracy": r["colour"] / r["n"],
                "shape_accuracy": r["shape"] / r["n"],
                "accuracy": r["both"] / r["n"],
            }
    return result


def format_report(result: dict) -> str:
    """A plain-text table of `evaluate`'s result."""
    lines = [f"{'prompt':<16}{'n':>6}{'colour':>9}{'shape':>9}{'both':>9}"]
    for p, r in result["per_class"].items():
        lines.append(f"{p:<16}{r['n']:>6}{r['colour_accuracy']:>9.1%}{r['shape_accuracy']:>9.1%}{r['accuracy']:>9.1%}")
    lines.append(
        f"{'all':<16}{result['n']:>6}{result['colour_accuracy']:>9.1%}"
        f"{result['shape_accuracy']:>9.1%}{result['accuracy']:>9.1%}"
    )
    return "\n".join(lines)
