"""Exact likelihood: images x prompts -> bits per dimension, one density pass each.

    pipe = Pipeline.from_pretrained("demo")
    r = pipe.score(["a.png", "b.png"], "all")     # every class of a class-conditional model
    r.bits_per_dim                               # (images, prompts); lower is more likely
    r.best()                                     # the most likely prompt per image

    python -m mlx_starflow.score --model demo --image a.png b.png --prompt all [--json out.json]

What is scored depends on what the flow models (D: dimensions per image):

- Pixel models (TarFlow; pixel STARFlow such as the demo): bits per dimension of
  the 8-bit image u. By default as apple/ml-tarflow's evaluate_bpd: uniform
  dequantization x = ((u + n) / 256) * 2 - 1, n ~ U[0, 1), and
  nll = -log p(x | y) + D log 128 (the change of scale from [-1, 1] to 8-bit
  levels). With noise_samples K > 0, the training objective instead:
  x = u / 127.5 - 1 + noise_std * eps and nll = -log p(x | y) + D log 127.5, the
  demo's held-out figure (demo.held_out_bpd, docs/demo.md). Both are the density
  of the perturbed image in 8-bit level units.
- Latent models (STARFlow with a VAE): the VAE's scaled posterior mean z
  (Pipeline.encode_images), nll = -log p(z | y), in bits per latent dimension;
  with noise_samples K, of z + noise_std * eps. This is the latent's likelihood
  under the flow, not the pixels' (the VAE is not a flow).

bits/dim = nll / (D ln 2); with K noise draws the nll is their mean. Guidance is
a sampling device and does not enter: the prompt's own conditional density is
scored ("" scores the unconditional density: the demo's unconditional label,
TarFlow's mean class embedding as the reference's evaluate_bpd). Every prompt of
an image sees the same noise draws, so prompts are compared on equal terms.
Scoring is a forward pass only: nothing is kept for a gradient.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .flow import Flow, IdentityBlock, log_normal
from .generate import LOAD_OPTIONS

__all__ = [
    "ScoreResult",
    "score",
    "load_images",
    "open_image",
    "batch_size_for",
    "noise_draw",
    "shared_blocks",
    "log_densities",
    "score_stage",
    "main",
]

MEMORY_BUDGET = 1 << 30  # bytes of activations a batch of the density pass may take
MAX_BATCH = 256
GRAYSCALE = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
LATENT_NOTE = "the likelihood of the image's VAE latent under the flow, not of its pixels (the VAE is not a flow)"


# -- images -------------------------------------------------------------------------------


def _name(item, i: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {i + 1}"


def open_image(item, name: Optional[str] = None):
    """A path, PIL image or uint8 array (H, W, 3) -> an RGB PIL image, or a
    ValueError naming the problem: missing or unreadable file, animated image,
    grayscale or not 3 channels, not uint8."""
    from PIL import Image, UnidentifiedImageError

    name = name or _name(item, 0)
    if isinstance(item, mx.array):
        item = np.array(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 2 or (item.ndim == 3 and item.shape[-1] == 1):
            raise ValueError(
                f"{name} is grayscale (shape {item.shape}); the model scores RGB images: "
                "give an (height, width, 3) array"
            )
        if item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(
                f"{name} has shape {item.shape}; the model scores RGB images: give an "
                "(height, width, 3) uint8 array"
                + (" (drop the alpha channel: a[..., :3])" if item.ndim == 3 and item.shape[-1] == 4 else "")
            )
        if item.dtype != np.uint8:
            raise ValueError(
                f"{name} is a {item.dtype} array; give 8-bit values (uint8, 0..255), e.g. "
                "np.round(a * 255).astype(np.uint8) for floats in [0, 1]"
            )
        return Image.fromarray(item, "RGB")
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ValueError(f"{name} is a folder, not an image file")
        if not path.exists():
            raise ValueError(f"{name}: no such file")
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(
                f"cannot read {name} as an image ({e}); give a PNG, JPEG or other still image Pillow can open"
            ) from None
    else:
        raise ValueError(f"{name} is a {type(item).__name__}; give a path, a PIL image or a uint8 array")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ValueError(
            f"{name} is animated or has several pages ({frames} frames); the model scores still "
            "images: save the frame to score as a PNG"
        )
    if img.mode in GRAYSCALE:
        raise ValueError(
            f"{name} is grayscale (mode {img.mode}); the model scores RGB images: convert it to RGB "
            "first (e.g. PIL's image.convert('RGB')) to score its grey version"
        )
    return img.convert("RGB") if img.mode != "RGB" else img


def _items(images) -> list:
    from PIL import Image

    if isinstance(images, mx.array):
        images = np.array(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"images must be a path, PIL image, uint8 array or a list of them, not {type(images).__name__}")


def load_images(images, size, resize: bool = True) -> Tuple[mx.array, List[Tuple[int, int]]]:
    """Paths, PIL images or uint8 arrays (H, W, 3) (one, a list, or an (N, H, W, 3)
    array) -> (images (N, H, W, 3) float32 in [-1, 1], each input's (width, height)).

    `size` is an int (square) or (width, height). As the reference's data pipeline,
    an image of another size is resized (bicubic) so it covers the size, then
    centre-cropped (vae.from_pil). An image smaller than the size is refused (its
    upscaled pixels would be invented, not scored); with resize=False any other
    size is refused. Bad input raises ValueError naming the image and the fix."""
    from .vae import from_pil

    tw, th = (size, size) if isinstance(size, int) else size
    items = _items(images)
    if not items:
        raise ValueError("give at least one image")
    out, sizes = [], []
    for i, item in enumerate(items):
        name = _name(item, i)
        img = open_image(item, name)
        w, h = img.size
        if (w, h) != (tw, th):
            if not resize:
                raise ValueError(
                    f"{name} is {w}x{h}; this model scores {tw}x{th} images and resizing is off: "
                    f"resize it to {tw}x{th}, or allow resizing (drop --no-resize / resize=False)"
                )
            if w < tw or h < th:
                raise ValueError(
                    f"{name} is {w}x{h}, smaller than the {tw}x{th} this model scores: upscaling "
                    f"would invent the pixels being scored; give an image of at least {tw}x{th}"
                )
        out.append(from_pil(img, (tw, th), factor=1))
        sizes.append((w, h))
    return mx.concatenate(out), sizes


# -- the score --------------------------------------------------------------------------------


@dataclass
class ScoreResult:
    bits_per_dim: np.ndarray  # (images, prompts): -log2 p per dimension; lower is more likely
    nll: np.ndarray  # (images, prompts): negative log-likelihood in nats per image (bits_per_dim * dims * ln 2)
    prompts: List[str]
    sizes: List[Tuple[int, int]]  # each image's (width, height) as given, before any resizing
    size: Tuple[int, int]  # the (width, height) scored
    dims: int  # dimensions per image of what is scored (pixels x 3, or the latent's)
    space: str  # "pixels" or "latents"
    method: str  # what was computed, in words
    samples: int  # noise draws averaged
    seed: Optional[int]  # the draws' seed (None when the dequantization noise was given)
    timings: dict = field(default_factory=dict)
    peak_memory: int = 0

    @property
    def resized(self) -> List[bool]:
        return [s != self.size for s in self.sizes]

    def best(self) -> List[str]:
        """The most likely prompt for each image (zero-shot classification)."""
        return [self.prompts[j] for j in np.argmin(self.bits_per_dim, axis=1)]

    def ranking(self, i: int) -> List[Tuple[str, float]]:
        """Image i's prompts, most likely first, with their bits per dimension."""
        order = np.argsort(self.bits_per_dim[i], kind="stable")
        return [(self.prompts[j], float(self.bits_per_dim[i, j])) for j in order]


def batch_size_for(flow: Flow, budget: int = MEMORY_BUDGET) -> int:
    """Images per density pass within `budget` bytes of activations: per image, the
    widest block's residual, attention inputs and scores and MLP hidden states, in
    float32 (a layer's activations are freed before the next one's)."""
    cfg = flow.config
    worst = 1
    for block in flow.blocks:
        if isinstance(block, IdentityBlock):
            continue
        T = cfg.num_tokens + (cfg.txt_size if block.has_text else 0)
        ch = block.proj_in.weight.shape[0]
        heads = block.attn_blocks[0].attention.heads if block.attn_blocks else 1
        worst = max(worst, 4 * T * (6 * ch + 3 * int(ch * cfg.expansion) + heads * T))
    return max(1, min(MAX_BATCH, budget // worst))


def noise_draw(seed: int, k: int, count: int, shape, uniform: bool) -> mx.array:
    """Draw k of `count` from `seed`: U[0, 1) (dequantization) or N(0, 1)."""
    key = mx.random.split(mx.random.key(seed), count)[k]
    return mx.random.uniform(shape=shape, key=key) if uniform else mx.random.normal(shape, key=key)


def shared_blocks(flow: Flow) -> int:
    """How many blocks, in density order, come before the first one the prompt
    enters: their output is the same for every prompt, so `score` runs them once
    per image (the demo's three shallow blocks; none for TarFlow)."""
    n = 0
    for block in flow.blocks:
        if not isinstance(block, IdentityBlock) and (block.has_text or "class_embed" in block):
            break
        n += 1
    return n


def log_densities(
    flow: Flow, x, y=None, *, batch_size: Optional[int] = None, on_batch: Optional[Callable] = None
) -> np.ndarray:
    """log p(x_i | y_j) in nats for every input x_i of x (N, H, W, C), in the
    flow's own space, and every conditioning row y_j of y (P rows: text
    embeddings, one-hot class rows or TarFlow class ids; None for an unconditional
    model): (N, P) float64. Pairs go through the density pass in batches of
    batch_size (default batch_size_for(flow)); the blocks before the first one the
    prompt enters run once per input. on_batch(pairs done) is called after each
    batch (one sync each)."""
    flow.check_input(x, "x")
    N, (h, w) = x.shape[0], flow.grid(x)
    P = 1 if y is None else y.shape[0]
    bs = batch_size or batch_size_for(flow)
    cut = shared_blocks(flow)
    shared = [flow.through(flow.patchify(x[s : s + bs]), None, h, w, flow.blocks[:cut]) for s in range(0, N, bs)]
    mx.eval(shared)
    tokens = mx.concatenate([t for t, _ in shared])
    ld0 = mx.concatenate([ld for _, ld in shared])
    pairs = np.array([(i, j) for i in range(N) for j in range(P)])
    out = np.zeros((N, P))
    for s in range(0, len(pairs), bs):
        i, j = pairs[s : s + bs, 0], pairs[s : s + bs, 1]
        ii = mx.array(i)
        z, ld = flow.through(tokens[ii], None if y is None else y[mx.array(j)], h, w, flow.blocks[cut:])
        lp = ld0[ii] + ld + log_normal(z)
        out[i, j] = np.array(lp, dtype=np.float64)  # one sync per batch
        if on_batch is not None:
            on_batch(s + len(i))
    return out


def _count(value, name, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
    return int(value)


def _unconditional(pipe) -> bool:
    return pipe.classes is None and not pipe.config.txt_dim


def resolve_prompts(pipe, prompts) -> List[str]:
    """The prompts to score: "all" (alone) is every class of a class-conditional
    model; class models need class names or ids; "" is the unconditional density
    (the only prompt of an unconditional model)."""
    from .pipeline import check_prompts as strings

    cl = pipe.classes
    if isinstance(prompts, (list, tuple)) and len(prompts) == 1 and prompts[0] == "all" or prompts == "all":
        if cl is None:
            raise ValueError(
                'the prompt "all" means every class of a class-conditional model; '
                "this model takes text prompts: give them"
            )
        return cl.labels
    prompts = strings(prompts)
    if _unconditional(pipe) and any(p.strip() for p in prompts):
        raise ValueError('this model is unconditional: its only prompt is "" (the image\'s density)')
    if cl is not None:
        for p in prompts:
            if p.strip() or cl.one_hot:  # TarFlow's "" is its mean class embedding (see _conditioning)
                cl.index(p)
    return prompts


def _conditioning(pipe, prompts) -> Optional[mx.array]:
    """One row per prompt, each prompt's text encoded once (the text encoder is then freed)."""
    cl = pipe.classes
    if _unconditional(pipe):
        return None
    if cl is not None and not cl.one_hot:  # TarFlow: a negative label is the mean class embedding
        return mx.array([cl.index(p) if p.strip() else -1 for p in prompts])
    return pipe.conditioning(prompts)[1]


def score(
    pipe,
    images,
    prompts,
    *,
    dequant_noise=None,
    noise_samples: int = 0,
    seed: Optional[int] = None,
    resize: bool = True,
    progress: Optional[Callable] = None,
    dequant_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> ScoreResult:
    """Negative log-likelihood of every image under every prompt (module doc: what
    exactly is computed).

    images: paths, PIL images or uint8 arrays (load_images); prompts: a string or a
    list, "all" for every class of a class-conditional model. Pixel models:
    dequant_noise, the dequantization noise in [0, 1) of shape (images, H, W, C) or
    (K, images, H, W, C) for K draws, or dequant_samples K draws from `seed`
    (default 1); or noise_samples K Gaussian draws at the model's noise_std instead.
    Latent models: noise_samples K (default 0, the clean latent). seed None draws
    one (recorded in the result). batch_size: pairs per density pass (default: what
    MEMORY_BUDGET allows). progress(stage, done, total), for the stages "text",
    "encode" (latent models) and "score", returning False raises Cancelled."""
    from .pipeline import Cancelled, expand_seeds

    cfg = pipe.config
    pixels = cfg.vae is None
    prompts = resolve_prompts(pipe, prompts)
    noise_samples = _count(noise_samples, "noise_samples", 0)
    if dequant_samples is not None:
        dequant_samples = _count(dequant_samples, "dequant_samples", 1)
    if batch_size is not None:
        batch_size = _count(batch_size, "batch_size", 1)
    if not pixels and (dequant_noise is not None or dequant_samples is not None):
        raise ValueError(
            "dequantization is for pixel models; this model scores VAE latents (use noise_samples for noisy latents)"
        )
    if noise_samples and (dequant_noise is not None or dequant_samples is not None):
        raise ValueError(
            "choose either dequantization (dequant_noise / dequant_samples) or Gaussian noise (noise_samples), not both"
        )
    if noise_samples and not cfg.noise_std > 0:
        raise ValueError("noise_samples needs the model's training noise, but its noise_std is 0")
    x, sizes = load_images(images, pipe.image_size(), resize)
    N, H, W, _ = x.shape
    given = None
    if dequant_noise is not None:
        given = dequant_noise if isinstance(dequant_noise, mx.array) else mx.array(np.asarray(dequant_noise))
        if given.ndim == 4:
            given = given[None]
        if given.ndim != 5 or tuple(given.shape[1:]) != (N, H, W, 3):
            raise ValueError(
                f"dequant_noise must have shape {(N, H, W, 3)} or (draws, {N}, {H}, {W}, 3), got {tuple(given.shape)}"
            )
        lo, hi = mx.min(given).item(), mx.max(given).item()
        if not (lo >= 0 and hi < 1):
            raise ValueError(f"dequant_noise must be in [0, 1), got values in [{lo}, {hi}]")
        given = given.astype(mx.float32)
    gaussian = noise_samples > 0
    K = given.shape[0] if given is not None else noise_samples if gaussian else (dequant_samples or 1) if pixels else 1
    seed = None if given is not None or not (pixels or gaussian) else expand_seeds(seed, 1)[0]
    if pixels and gaussian:
        method = (
            f"Gaussian noise at the training noise_std {cfg.noise_std:g}, {K} draw{'s' * (K > 1)} "
            f"(seed {seed}): density of the noised 8-bit image (x = u/127.5 - 1 + noise)"
        )
    elif pixels:
        method = (
            f"uniform dequantization as apple/ml-tarflow, {K} draw{'s' * (K > 1)}"
            + (f" (seed {seed})" if seed is not None else " (given)")
            + ": x = ((u + n)/256)*2 - 1"
        )
    elif gaussian:
        method = (
            f"the noised latent at noise_std {cfg.noise_std:g}, {K} draw{'s' * (K > 1)} (seed {seed}); {LATENT_NOTE}"
        )
    else:
        method = f"the clean latent (VAE posterior mean, scaled); {LATENT_NOTE}"

    def report(stage, done, total):
        if progress is not None and progress(stage, done, total) is False:
            raise Cancelled(stage)

    with pipe._lock:
        timings = {}
        mx.reset_peak_memory()
        report("text", 0, 1)
        t0 = time.perf_counter()
        y = _conditioning(pipe, prompts)
        if y is not None:
            mx.eval(y)
        timings["text"] = time.perf_counter() - t0
        report("text", 1, 1)

        if pixels:
            u = mx.round((x + 1) * 127.5)  # load_images' x is u / 127.5 - 1 exactly
            base = x
        else:
            t0 = time.perf_counter()
            latents = []
            for i in range(N):  # one at a time: the encoder's activations dominate memory
                report("encode", i, N)
                latents.append(pipe.encode_images(x[i : i + 1]))
            report("encode", N, N)
            base = mx.concatenate(latents)
            mx.eval(base)
            timings["encode"] = time.perf_counter() - t0
        shape = tuple(base.shape)
        D = math.prod(shape[1:])
        pipe.flow.check_input(base, "images")

        def draw(k):
            if given is not None:
                return (u + given[k]) / 128 - 1  # ((u + n) / 256) * 2 - 1
            if gaussian:
                return base + cfg.noise_std * noise_draw(seed, k, K, shape, uniform=False)
            if pixels:
                return (u + noise_draw(seed, k, K, shape, uniform=True)) / 128 - 1
            return base

        P = len(prompts)
        total = K * N * P
        nll = np.zeros((N, P))
        t0 = time.perf_counter()
        report("score", 0, total)
        for k in range(K):  # an unconditional model's (N, 1) broadcasts over its "" prompts
            nll -= log_densities(
                pipe.flow,
                draw(k),
                y,
                batch_size=batch_size,
                on_batch=lambda done, k=k: report("score", k * N * P + done, total),
            )
        timings["score"] = time.perf_counter() - t0
        nll /= K
        if pixels:  # [-1, 1] -> 8-bit levels: 128 per unit for the dequantized image, 127.5 for u/127.5 - 1
            nll += D * math.log(127.5 if gaussian else 128.0)
        return ScoreResult(
            bits_per_dim=nll / (D * math.log(2)),
            nll=nll,
            prompts=list(prompts),
            sizes=sizes,
            size=(W, H),
            dims=D,
            space="pixels" if pixels else "latents",
            method=method,
            samples=K,
            seed=seed,
            timings=timings,
            peak_memory=mx.get_peak_memory(),
        )


# -- the benchmark's stage ------------------------------------------------------------------


def score_stage(
    flow: Flow, y=None, *, batch_size: Optional[int] = None, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict:
    """The benchmark's `score` stage: the density pass as `score` runs it (batches of
    batch_size_for(flow) by default), on random inputs of the flow's own shape with
    one prompt's conditioning (the first row of y). The VAE encoding of latent models is
    not included. Returns the batch, seconds per batch (median, min, max),
    images per second and MLX's peak memory (weights included)."""
    from .machine import times

    cfg = flow.config
    bs = batch_size or batch_size_for(flow)
    side = cfg.input_size
    x = mx.random.normal((bs, side, side, cfg.in_channels), key=mx.random.key(seed))
    y = None if y is None else y[:1]
    mx.eval(x, *([] if y is None else [y]))
    mx.reset_peak_memory()
    ts = times(lambda: log_densities(flow, x, y, batch_size=bs), repeats, warmup)
    med = statistics.median(ts)
    return {
        "batch": bs,
        "seconds": {"median": med, "min": min(ts), "max": max(ts), "n": len(ts)},
        "images_per_second": bs / med,
        "peak_memory": mx.get_peak_memory(),
    }


# -- the command line -----------------------------------------------------------------------

# generate's loading options (scoring decodes nothing: no VAE tiling)
LOAD_ARGS = ("model",) + tuple(k for k in LOAD_OPTIONS if k != "vae_tile")


def parser():
    from . import generate

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    p = argparse.ArgumentParser(
        prog=name if name.startswith("mlx-starflow-") else "python -m mlx_starflow.score",
        formatter_class=generate.HelpFormatter,
        description="The exact likelihood of images under prompts, in bits per dimension (lower: more likely), "
        "and the most likely prompt of each image (zero-shot classification with several prompts).",
        epilog="Pixel models (TarFlow, the demo) score the 8-bit image: uniform dequantization as "
        "apple/ml-tarflow's evaluate_bpd by default, or the Gaussian noise they were trained with "
        "(--noise-samples). STARFlow models with a VAE score " + LATENT_NOTE + ": the image is encoded "
        "(the scaled posterior mean) and the flow gives the latent's density given the prompt, in bits "
        "per latent dimension. Guidance does not enter the likelihood.",
    )
    p.add_argument("--image", metavar="FILE", nargs="*", required=True, help="one or more still RGB images")
    p.add_argument(
        "--prompt",
        metavar="P",
        nargs="*",
        required=True,
        help="one or more prompts; for a class-conditional model class names or ids, or 'all' for "
        "every class; '' is the unconditional density",
    )
    gen = {a.dest: a for a in generate.parser()._actions}
    for dest in LOAD_ARGS:  # the same loading options as generate, from its parser
        p._add_action(gen[dest])
    p.add_argument(
        "--dequant-samples",
        metavar="K",
        type=int,
        default=None,
        help="pixel models: average K uniform dequantization draws (default 1)",
    )
    p.add_argument(
        "--noise-samples",
        metavar="K",
        type=int,
        default=0,
        help="average K draws of Gaussian noise at the model's training noise_std (its training "
        "objective); 0: pixel models dequantize, latent models score the clean latent",
    )
    p.add_argument(
        "--seed", metavar="N", type=int, default=None, help="seed of the noise draws (default: random, printed)"
    )
    p.add_argument(
        "--no-resize",
        action="store_true",
        help="refuse images of another size instead of resizing and centre-cropping them to the model's size",
    )
    p.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=None,
        help="image-prompt pairs per density pass (default: what a 1 GiB activation budget allows)",
    )
    p.add_argument(
        "--json", metavar="FILE", default=None, help="also write the scores as JSON (written whole, at the end)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (only shown on a terminal)")
    return p


def to_json(result: ScoreResult, names: Sequence[str], model: Optional[str] = None) -> dict:
    images = []
    for i, name in enumerate(names):
        images.append(
            {
                "image": name,
                "size": list(result.sizes[i]),
                "resized": result.resized[i],
                "bits_per_dim": [float(v) for v in result.bits_per_dim[i]],
                "nll": [float(v) for v in result.nll[i]],
                "ranking": [[p, b] for p, b in result.ranking(i)],
                "most_likely": result.best()[i],
            }
        )
    return {
        "model": model,
        "space": result.space,
        "method": result.method,
        "dims": result.dims,
        "size": list(result.size),
        "samples": result.samples,
        "seed": result.seed,
        "prompts": result.prompts,
        "images": images,
    }


def report_lines(result: ScoreResult, names: Sequence[str]) -> List[str]:
    unit = "bits per dimension of the 8-bit image" if result.space == "pixels" else "bits per latent dimension"
    lines = [f"{unit}, lower is more likely; {result.method}"]
    w, h = result.size
    width = max(len(p) for p in result.prompts) if result.prompts else 0
    for i, name in enumerate(names):
        sw, sh = result.sizes[i]
        how = f", resized and centre-cropped to {w}x{h}" if result.resized[i] else ""
        lines.append(f"{name} ({sw}x{sh}{how})")
        for rank, (p, b) in enumerate(result.ranking(i)):
            lines.append(
                f"  {b:9.4f}  {p!r:<{width + 2}}" + ("  most likely" if rank == 0 and len(result.prompts) > 1 else "")
            )
    return lines


def main(argv=None) -> int:
    from .generate import Bars, atomic_write, check_writable, run_command
    from .pipeline import Pipeline

    args = parser().parse_args(argv)
    bars = Bars(not args.no_progress)

    def body():
        for flag, v, low in (
            ("--dequant-samples", args.dequant_samples, 1),
            ("--noise-samples", args.noise_samples, 0),
            ("--batch-size", args.batch_size, 1),
        ):
            if v is not None and v < low:
                raise ValueError(f"{flag} must be at least {low}, not {v}")
        if not args.image:
            raise ValueError("--image: give at least one image file")
        if not args.prompt:
            raise ValueError(
                "--prompt: give at least one prompt (or 'all' for every class of a class-conditional model)"
            )
        out = Path(args.json) if args.json else None
        if out is not None:
            if out.exists() and not args.overwrite:
                raise ValueError(f"{out} already exists; choose another --json file or pass --overwrite")
            check_writable([out], True)  # its folder exists and is writable
        for path in args.image:  # bad files fail before the model loads
            open_image(path, path)
        pipe = Pipeline.from_pretrained(**{k: getattr(args, k) for k in LOAD_ARGS})
        result = pipe.score(
            args.image,
            args.prompt,
            noise_samples=args.noise_samples,
            seed=args.seed,
            resize=not args.no_resize,
            progress=bars,
            dequant_samples=args.dequant_samples,
            batch_size=args.batch_size,
        )
        bars.close()
        if out is not None:
            text = json.dumps(to_json(result, args.image, args.model), indent=2) + "\n"
            atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        print("\n".join(report_lines(result, args.image)), flush=True)
        return 0

    return run_command(body, bars, nothing="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
