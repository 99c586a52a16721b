"""Judging the text demo with the checker, on prompts it never saw in training.

- held-out combinations, one object: a colour-shape, shape-place or colour-size pair
  no training caption has; every attribute stated; split by training and held-out
  sentence forms. Accuracy of colour, shape, size and cell per object.
- two objects: the first of a held-out combination; both present = each one's
  colour and shape found.
- zero-shot captions: for an image (the model's own sample of a held-out prompt, or
  drawn by scenes.py), its caption and nine others each with one attribute of one
  object changed, written with the same phrasing; ranked by exact likelihood
  (Pipeline.score); right = its own caption first.
"""

from dataclasses import replace

import numpy as np

from ..demo_common import training
from ..pipeline import Pipeline
from . import checker, scenes

EVAL_SEED = 7_000_003
SELECT_SEED = 8_000_009
RANK_SEED = 9_000_011
# The ranking scores each image noised as in training (Gaussian at the model's
# noise_std), averaged over this many draws; 0: one uniform dequantization draw.
RANK_NOISE = 8
ATTRIBUTES = ("colour", "shape", "size", "cell")


def prompts(n, seed, objects=1, held_phrasing=None):
    """n (caption text, scene) of held-out combinations with every attribute stated."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = scenes.random_scene(rng, n=objects, held=True)
        out.append((scenes.caption(scene, rng, held_phrasing=held_phrasing, full=True).text, scene))
    return out


def generate(pipe: Pipeline, texts, seed, batch=48, **options):
    images = []
    with pipe.exclusive(keep_text_encoder=True):  # the text encoder loaded once
        for i in range(0, len(texts), batch):
            r = pipe.generate(texts[i : i + batch], seed=seed + i, **options)
            images += [np.asarray(im) for im in r.images]
    return images


def judge(images, items):
    """Per-object checker verdicts: {attribute: [bool]}, plus both-present for two-object scenes."""
    res = {a: [] for a in ATTRIBUTES + ("present",)}
    both = []
    for im, (_, scene) in zip(images, items):
        verdicts = checker.judge(im, [(t.colour, t.shape, t.size, t.cell) for t in scene.things])
        for v in verdicts:
            for a in res:
                res[a].append(bool(v[a]))
        if len(scene.things) == 2:
            both.append(all(v["present"] for v in verdicts))
    out = {a: float(np.mean(v)) for a, v in res.items()}
    if both:
        out["both_present"] = float(np.mean(both))
    out["n"] = len(images)
    return out


def checker_accuracy(pipe, n=96, seed=EVAL_SEED, objects=1, held_phrasing=None, **options):
    items = prompts(n, seed, objects, held_phrasing)
    images = generate(pipe, [t for t, _ in items], seed, **options)
    r = judge(images, items)
    r["images"], r["prompts"] = images, [t for t, _ in items]
    return r


def select_sampling(pipe, guidances=(0.5, 1.0, 2.0, 3.0), n=48, log=print):
    """The guidance and denoising whose samples the checker likes best (mean of the four
    attribute accuracies on held-out single objects, noise apart from the evaluation's):
    the score step smooths edges, which can turn a square's corners round."""

    def measure(g, sampler, denoise):
        r = checker_accuracy(pipe, n, SELECT_SEED, guidance=g, sampler=sampler, denoise=denoise)
        score = float(np.mean([r[a] for a in ATTRIBUTES]))
        return score, f"guidance {g:g}, denoise {denoise}: " + "  ".join(f"{a} {r[a]:.1%}" for a in ATTRIBUTES)

    return training.select_sampling(measure, guidances, denoisers=("score", "none"), log=log)


def distractors(scene: scenes.Scene, rng, k=9):
    """k different scenes, each with one attribute of one object changed."""
    out, seen = [], {scene}
    for _ in range(1000):
        if len(out) == k:
            break
        i = int(rng.integers(len(scene.things)))
        attr = str(rng.choice(ATTRIBUTES))
        things = list(scene.things)
        things[i] = scenes.change(things[i], attr, rng, scene)
        new = replace(scene, things=tuple(things))
        if new not in seen:
            seen.add(new)
            out.append(new)
    return out


def rank_captions(
    pipe, n=50, seed=RANK_SEED, source="drawn", objects=1, held=True, noise_samples=RANK_NOISE, **options
):
    """Share of images whose own caption is the most likely of ten (and the mean rank);
    held: scenes of held-out combinations (else of training ones)."""
    with pipe.exclusive(keep_text_encoder=True):
        return _rank(pipe, n, seed, source, objects, held, noise_samples, **options)


def _rank(pipe, n, seed, source, objects, held, noise_samples, **options):
    rng = np.random.default_rng(seed)
    firsts, ranks = [], []
    for j in range(n):
        scene = scenes.random_scene(rng, n=objects, held=held)
        phr = int(rng.integers(2**31))
        captions = [
            scenes.caption(s, np.random.default_rng(phr), held_phrasing=None, full=True).text
            for s in [scene] + distractors(scene, rng)
        ]
        if source == "drawn":
            image = scenes.draw(scene, rng)
        else:
            image = np.asarray(pipe.generate([captions[0]], seed=seed + j, **options).images[0])
        bpd = pipe.score([image], captions, seed=0, noise_samples=noise_samples).bits_per_dim[0]
        ranks.append(int(np.argsort(np.argsort(bpd))[0]))
        firsts.append(ranks[-1] == 0)
    return {"first": float(np.mean(firsts)), "mean_rank": float(np.mean(ranks)) + 1, "n": n}
