"""Drawing for the demos: pixels to the model's range and back, one anti-aliased shape
(the image and video data sets draw the same circle, square and triangle), and the
labelled picture of sample rows the demos' grid and strip commands save."""

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # a shape is drawn at 4x, then box-filtered: exact area coverage


def to_model(images) -> np.ndarray:
    """uint8 pixels (any leading shape, RGB last) to the model's float32 range [-1, 1]."""
    return np.asarray(images, dtype=np.float32) / 127.5 - 1.0


def from_model(x) -> np.ndarray:
    """Model output in [-1, 1] (numpy or mlx) back to uint8."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def jittered_colours(rng: np.random.Generator, colour):
    """(background, foreground) RGB tuples: an off-white background (a shared brightness
    shift plus a faint tint) and `colour` with a mild jitter, small enough that every hue
    stays far from its neighbours. Draws the background's numbers first."""
    bg = 234 + rng.uniform(-8, 8) + rng.uniform(-4, 4, size=3)
    fg = np.array(colour) + rng.uniform(-12, 12, size=3)
    bg = tuple(int(v) for v in np.clip(np.round(bg), 0, 255))
    fg = tuple(int(v) for v in np.clip(np.round(fg), 0, 255))
    return bg, fg


def draw_shape(shape: str, fg, bg, x0: float, y0: float, w: float, h: float, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image: `shape` (circle, square, or an upright triangle
    with its apex at the top) filling the box at (x0, y0) of w x h pixels, on `bg`."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (size * k, size * k), bg)
    d = ImageDraw.Draw(big)
    # Pixel (i, j) covers [i, i+1) at 4x, so the last covered pixel is the end minus one.
    box = [x0 * k, y0 * k, (x0 + w) * k - 1, (y0 + h) * k - 1]
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    else:
        left, top, right, bottom = box
        d.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fg)
    return np.array(big.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def labelled_rows(tiles: np.ndarray, labels=None, left=110, scale=4, gap=2) -> Image.Image:
    """A PIL image of uint8 tiles (rows, cols, H, W, 3), each upscaled by `scale`, a row's
    label (if any) in the `left` pixels before it, on white."""
    rows, cols, h, w, _ = tiles.shape
    tile_h, tile_w = h * scale, w * scale
    canvas = Image.new("RGB", (left + cols * (tile_w + gap), gap + rows * (tile_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y0 = gap + r * (tile_h + gap)
        if labels:
            draw.text((6, y0 + tile_h // 2 - 6), labels[r], fill=(0, 0, 0))
        for c in range(cols):
            tile = Image.fromarray(tiles[r, c]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + c * (tile_w + gap), y0))
    return canvas
