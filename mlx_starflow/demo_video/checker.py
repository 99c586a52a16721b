"""Judging clips from their pixels: the colour of the moving blob in every frame, and
the direction of its motion from the track of its centre.

Written apart from the drawing code (clips.py): nothing here is imported from it or
shares its constants. It knows only what a prompt says (a colour name among red,
green, blue, yellow, and a direction among right, left, up, down) and looks at
frames as numbers:

- the background of a frame is its per-channel median (a shape covers far less than
  half of a frame);
- the blob is the largest 4-connected group of pixels far from the background;
- its colour is the hue of the median of its inner pixels, named by the nearest
  reference hue (none when washed out or grey);
- its centre is the coverage-weighted mean position of the pixels around the blob;
- the direction is the sign of the larger of the two least-squares velocities of the
  centre over the frames, if the centre moves far enough along that axis and clearly
  more than across it; else there is no direction.

Frames are (H, W, 3) uint8, clips (T, H, W, 3); image coordinates, y pointing down.
"""

import colorsys
from typing import Optional

import numpy as np

# Reference hues in degrees; the nearest one names a blob's colour.
HUES = {"red": 0.0, "yellow": 52.0, "green": 128.0, "blue": 228.0}
MIN_SATURATION = 0.3
# A direction needs the centre to move at least this many pixels over the clip along its
# axis, and the velocity along it at least this many times the velocity across it.
MIN_TRAVEL = 2.0
MIN_DOMINANCE = 2.0
# At least this share of the frames must show a blob to judge the motion.
MIN_TRACKED = 0.75


def _components(mask: np.ndarray) -> np.ndarray:
    """Label image of the 4-connected components of `mask` (0: outside)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not labels[v, u]:
                    labels[v, u] = n
                    stack.append((v, u))
    return labels


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])


def blob(frame: np.ndarray) -> Optional[dict]:
    """The frame's foreground blob: {"colour", "hue", "saturation", "centre" (x, y),
    "area"}; None when nothing stands out from the background."""
    img = np.asarray(frame, dtype=np.float32)[..., :3]
    h, w, _ = img.shape
    bg = np.median(img.reshape(-1, 3), axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    spread = np.median(dist)
    thresh = max(45.0, 4.0 * spread, 0.4 * dist.max())
    mask = dist > thresh
    if mask.sum() < 3:
        return None
    labels = _components(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    main = labels == int(np.argmax(sizes))
    if main.sum() < 3:
        return None
    # Colour from the strongest half of the blob (edges blend into the background).
    d = dist[main]
    inner = img[main][d >= np.median(d)]
    fg = np.median(inner, axis=0)
    r, g, b = np.clip(fg, 0, 255) / 255.0
    hue, _, sat = colorsys.rgb_to_hls(r, g, b)
    hue *= 360.0
    colour = None
    if sat >= MIN_SATURATION:
        colour = min(HUES, key=lambda c: min(abs(hue - HUES[c]), 360.0 - abs(hue - HUES[c])))
    # Coverage: each pixel's position between the background and the blob's colour,
    # counted only near the blob so that stray pixels elsewhere do not pull the centre.
    axis = fg - bg
    cover = np.clip((img - bg) @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    cover = np.where(_grow(_grow(main)), cover, 0.0)
    area = float(cover.sum())
    if area < 1.0:
        return None
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    centre = (float((cover * xx).sum() / area), float((cover * yy).sum() / area))
    return {"colour": colour, "hue": float(hue), "saturation": float(sat), "centre": centre, "area": area}


def direction(centres) -> Optional[str]:
    """right/left/up/down from a track of (x, y) centres (None where a frame had no
    blob), or None when the motion is unclear."""
    known = [(t, c) for t, c in enumerate(centres) if c is not None]
    if len(known) < max(2, MIN_TRACKED * len(centres)):
        return None
    t = np.array([k for k, _ in known], dtype=np.float64)
    xy = np.array([c for _, c in known], dtype=np.float64)
    t = t - t.mean()
    vx, vy = (t @ (xy - xy.mean(axis=0))) / (t @ t)
    span = len(centres) - 1
    along, across = (vx, vy) if abs(vx) >= abs(vy) else (vy, vx)
    if abs(along) * span < MIN_TRAVEL or abs(along) < MIN_DOMINANCE * abs(across):
        return None
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def judge(clip: np.ndarray) -> dict:
    """{"colours": the colour of each frame (None: none found), "direction", "centres"}."""
    blobs = [blob(f) for f in np.asarray(clip)]
    centres = [None if b is None else b["centre"] for b in blobs]
    return {
        "colours": [None if b is None else b["colour"] for b in blobs],
        "direction": direction(centres),
        "centres": centres,
    }


def _wanted(prompt: str):
    """(colour, direction) named by a prompt "<colour> <shape> moving <direction>"."""
    words = prompt.lower().split()
    colour = next((w for w in words if w in HUES), None)
    where = next((w for w in words if w in ("right", "left", "up", "down")), None)
    if colour is None or where is None:
        raise ValueError(f"the prompt {prompt!r} names no colour of {list(HUES)} or no direction")
    return colour, where


def evaluate(clips, prompts) -> dict:
    """Colour per frame and direction per clip against the prompts, overall and per
    prompt: {"frames", "clips", "colour_accuracy" (share of frames), "direction_accuracy"
    (share of clips), "per_prompt": {prompt: {...}}, "judged": [judge() per clip]}."""
    per, judged = {}, []
    for clip, prompt in zip(clips, prompts):
        colour, where = _wanted(prompt)
        j = judge(clip)
        judged.append(j)
        row = per.setdefault(prompt, {"clips": 0, "frames": 0, "colour": 0, "direction": 0})
        row["clips"] += 1
        row["frames"] += len(j["colours"])
        row["colour"] += sum(c == colour for c in j["colours"])
        row["direction"] += j["direction"] == where
    frames = sum(r["frames"] for r in per.values())
    n = sum(r["clips"] for r in per.values())
    result = {
        "clips": n,
        "frames": frames,
        "colour_accuracy": sum(r["colour"] for r in per.values()) / max(frames, 1),
        "direction_accuracy": sum(r["direction"] for r in per.values()) / max(n, 1),
        "per_prompt": {},
        "judged": judged,
    }
    for p, r in per.items():
        result["per_prompt"][p] = {
            "clips": r["clips"],
            "colour_accuracy": r["colour"] / max(r["frames"], 1),
            "direction_accuracy": r["direction"] / r["clips"],
        }
    return result


def format_report(result: dict) -> str:
    """A plain-text table of `evaluate`'s result."""
    width = max([len(p) for p in result["per_prompt"]] + [6]) + 2
    lines = [f"{'prompt':<{width}}{'clips':>6}{'colour':>9}{'direction':>11}"]
    for p, r in result["per_prompt"].items():
        lines.append(f"{p:<{width}}{r['clips']:>6}{r['colour_accuracy']:>9.1%}{r['direction_accuracy']:>11.1%}")
    lines.append(
        f"{'all':<{width}}{result['clips']:>6}{result['colour_accuracy']:>9.1%}{result['direction_accuracy']:>11.1%}"
    )
    return "\n".join(lines)
