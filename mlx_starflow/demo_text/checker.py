"""Reads a text-demo image from its pixels: which coloured shapes, where, how big.

Written apart from the drawing code (scenes.py): it imports nothing from it and
knows only what a caption promises: six colour names by hue, three shapes, two
sizes, a 3x3 grid of cells on a plain neutral background.

    objects = read(image)   # [Found(colour, shape, size, cell, area), ...], largest first

How: the background is neutral (grey levels), the shapes saturated, so the
foreground is the pixels whose saturation is high; its 4-connected blobs of at
least MIN_AREA pixels are the objects. Colour: the nearest of the six hues to the
blob's mean hue (a circular mean). Cell: the blob's centre of mass on the 3x3
grid. Size: the blob's extent (the larger side of its bounding box) against a
threshold half way between a small and a large object. Shape: a triangle is
heavier at the bottom than at the top; a square fills the corners of its bounding
box, a circle does not.
"""

import colorsys
import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

HUES = {"red": 0.0, "yellow": 57.0, "green": 122.0, "cyan": 183.0, "blue": 235.0, "purple": 288.0}
GRID = 3
MIN_AREA = 6  # pixels
SIZE_THRESHOLD = 8.0  # pixels across: small below, large above


@dataclass
class Found:
    colour: str
    shape: str
    size: str
    cell: Tuple[int, int]
    area: int


def _saturation(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32) / 255.0
    mx_, mn = x.max(-1), x.min(-1)
    return np.where(mx_ > 0.05, (mx_ - mn) / np.maximum(mx_, 1e-6), 0.0)


def _blobs(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pix = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pix.append((r, c))
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pix))
    return out


def _hue_name(pixels: np.ndarray) -> str:
    angles = []
    for p in pixels.astype(np.float32) / 255.0:
        h, _, _ = colorsys.rgb_to_hsv(*p)
        angles.append(2 * math.pi * h)
    a = np.array(angles)
    mean = math.degrees(math.atan2(np.sin(a).mean(), np.cos(a).mean())) % 360
    return min(HUES, key=lambda n: min(abs(mean - HUES[n]), 360 - abs(mean - HUES[n])))


def _shape(pix: np.ndarray, sat: np.ndarray) -> str:
    r0, c0 = pix.min(0)
    r1, c1 = pix.max(0)
    box = np.zeros((r1 - r0 + 1, c1 - c0 + 1), dtype=np.float32)
    box[pix[:, 0] - r0, pix[:, 1] - c0] = 1.0
    h, w = box.shape
    # Mass of the top and the bottom half of the box (a middle row counts half to each).
    rows = box.sum(1)
    mid = (h - 1) / 2
    top = sum(v * (1.0 if i < mid else 0.5 if i == mid else 0.0) for i, v in enumerate(rows))
    bottom = sum(v * (1.0 if i > mid else 0.5 if i == mid else 0.0) for i, v in enumerate(rows))
    if top < 0.72 * bottom:
        return "triangle"
    # How much of each corner pixel of the box the colour covers, against the blob's middle.
    level = np.median(sat[pix[:, 0], pix[:, 1]])
    corners = [sat[r, c] / level for r in (r0, r1) for c in (c0, c1)]
    if np.mean(np.minimum(corners, 1.0)) > 0.5:
        return "square"
    return "circle"


def read(image) -> List[Found]:
    """The objects of an image (H, W, 3) uint8, largest first."""
    img = np.asarray(image)[..., :3]
    sat = _saturation(img)
    value = img.max(-1) / 255.0
    mask = (sat > 0.42) & (value > 0.25)
    h, w = mask.shape
    found = []
    for pix in _blobs(mask):
        if len(pix) < MIN_AREA:
            continue
        colour = _hue_name(img[pix[:, 0], pix[:, 1]])
        centre = pix.mean(0) + 0.5
        cell = (min(int(centre[0] * GRID / h), GRID - 1), min(int(centre[1] * GRID / w), GRID - 1))
        extent = max(pix[:, 0].max() - pix[:, 0].min() + 1, pix[:, 1].max() - pix[:, 1].min() + 1)
        size = "large" if extent >= SIZE_THRESHOLD else "small"
        found.append(Found(colour, _shape(pix, sat), size, cell, len(pix)))
    return sorted(found, key=lambda f: -f.area)


def judge(image, wanted) -> List[dict]:
    """For each wanted object (colour, shape, size, cell): is each attribute right?
    The object compared is the found blob of its colour nearest its cell (else the
    largest blob left); `present` is colour and shape both right."""
    found = read(image)
    out = []
    for colour, shape, size, cell in wanted:
        same = [f for f in found if f.colour == colour]
        pool = same or found
        if not pool:
            out.append(dict(colour=False, shape=False, size=False, cell=False, present=False, found=None))
            continue
        f = min(pool, key=lambda f: (abs(f.cell[0] - cell[0]) + abs(f.cell[1] - cell[1]), -f.area))
        ok = dict(colour=f.colour == colour, shape=f.shape == shape, size=f.size == size, cell=f.cell == tuple(cell))
        ok["present"] = ok["colour"] and ok["shape"]
        ok["found"] = f
        out.append(ok)
    return out
