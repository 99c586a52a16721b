"""Procedural clips: the video demo model's data set.

A clip is FRAMES frames of SIZE x SIZE RGB: one shape (circle, square, triangle) of
one colour (red, green, blue, yellow) on a plain off-white background, moving in a
straight line at constant speed in one of four directions (right, left, up, down),
from near one edge towards the other. The 48 classes are the prompts
"<colour> <shape> moving <direction>", colour-major, then shape, then direction:

    0 red circle moving right    1 red circle moving left    2 red circle moving up ...
    47 yellow triangle moving down

This module draws; it does not judge. The checker that judges the model's samples is
checker.py, written apart from this file: it shares none of its code or constants.
"""

import math

import numpy as np

from ..demo_common.drawing import draw_shape, jittered_colours
from ..demo_common.drawing import from_model as from_model
from ..demo_common.drawing import to_model as to_model

SIZE = 16  # pixels along a side of a frame
FRAMES = 8
FPS = 8

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 195, 30),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion of each direction in image coordinates (x right, y down).
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
PROMPTS = tuple(f"{c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS)

# Drawing (demo_common.drawing): 4x supersampling, then a box filter (exact area coverage),
# so motion below a pixel shows as a change of the edges.
_MIN_SIDE, _MAX_SIDE = 4.5, 5.5  # the shape's width in pixels
_MIN_SPEED, _MAX_SPEED = 1.0, 1.3  # pixels per frame: a clear move per frame (slower was learnt as a copy)
_MARGIN = 0.5  # pixels kept free at the border


def prompt_to_class(prompt: str) -> int:
    """Class index of a prompt like "Red circle  moving right"; ValueError names the valid ones."""
    key = " ".join(str(prompt).lower().split())
    if key in PROMPTS:
        return PROMPTS.index(key)
    raise ValueError(
        f"Unknown prompt {prompt!r}. The video demo knows '<colour> <shape> moving <direction>' with colour "
        f"{'/'.join(COLOURS)}, shape {'/'.join(SHAPES)} and direction {'/'.join(DIRECTIONS)}."
    )


def class_to_prompt(i: int) -> str:
    if not 0 <= int(i) < len(PROMPTS):
        raise ValueError(f"Class index must be in [0, {len(PROMPTS)}), got {i}.")
    return PROMPTS[int(i)]


def split_prompt(i: int):
    """(colour, shape, direction) of class i."""
    colour, shape, _, direction = class_to_prompt(i).split()
    return colour, shape, direction


def draw(cls: int, rng: np.random.Generator, size: int = SIZE, frames: int = FRAMES) -> np.ndarray:
    """One clip (frames, size, size, 3) uint8 of class `cls`."""
    colour, shape, direction = split_prompt(cls)
    bg, fg = jittered_colours(rng, COLOURS[colour])

    w = rng.uniform(_MIN_SIDE, _MAX_SIDE) * size / 16
    h = w * math.sqrt(3) / 2 if shape == "triangle" else w
    speed = rng.uniform(_MIN_SPEED, _MAX_SPEED) * size / 16
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[direction]
    # Along the motion: room for the whole path; across it: anywhere inside.
    along = w if dx else h
    start = rng.uniform(_MARGIN, max(size - _MARGIN - along - travel, _MARGIN))
    x0 = start if dx > 0 else size - along - start if dx < 0 else rng.uniform(_MARGIN, size - _MARGIN - w)
    y0 = start if dy > 0 else size - along - start if dy < 0 else rng.uniform(_MARGIN, size - _MARGIN - h)
    clip = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t] = draw_shape(shape, fg, bg, x0 + dx * speed * t, y0 + dy * speed * t, w, h, size)
    return clip


def make_dataset(n: int, seed: int, size: int = SIZE, frames: int = FRAMES):
    """`n` clips (n, frames, size, size, 3) uint8 and their labels from one seed; class
    counts differ by at most one, and a set smaller than the 48 classes starts at a
    random class (so batches of 32 cover them all)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation((rng.integers(len(PROMPTS)) + np.arange(n)) % len(PROMPTS))
    clips = np.empty((n, frames, size, size, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        clips[i] = draw(int(c), rng, size, frames)
    return clips, labels.astype(np.int64)
