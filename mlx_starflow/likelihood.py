"""Exact likelihood: images x prompts -> bits per dimension, one density pass each.

    pipe = Pipeline.from_pretrained("demo")
    r = pipe.score(["a.png", "b.png"], "all")     # every class of a class-conditional model
    r.bits_per_dim                               # (images, prompts); lower is more likely
    r.best()                                     # the most likely prompt per image

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

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .images import image_items, load_images
from .models.flow import Flow, IdentityBlock, log_normal
from .options import Cancelled, check_prompts, expand_seeds

__all__ = [
    "ScoreResult",
    "score",
    "batch_size_for",
    "noise_draw",
    "shared_blocks",
    "log_densities",
]

MEMORY_BUDGET = 1 << 30  # bytes of activations a batch of the density pass may take
MAX_BATCH = 256
LATENT_NOTE = "the likelihood of the image's VAE latent under the flow, not of its pixels (the VAE is not a flow)"


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


# The most noise draws per image, image-prompt pairs per pass, and images per call that
# `score` takes (every option that sets work has an upper limit).
MAX_SAMPLES = 64
MAX_IMAGES = 256
COUNTS = {"noise_samples": (0, MAX_SAMPLES), "dequant_samples": (1, MAX_SAMPLES), "batch_size": (1, MAX_BATCH)}


def check_count(name: str, value):
    """A count option of `score` as an int within COUNTS[name], or a ValueError naming it."""
    low, high = COUNTS[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
    return int(value)


def _unconditional(pipe) -> bool:
    return pipe.classes is None and not pipe.config.txt_dim


def resolve_prompts(pipe, prompts) -> List[str]:
    """The prompts to score: "all" (alone) is every class of a class-conditional
    model; class models need class names or ids; "" is the unconditional density
    (the only prompt of an unconditional model)."""
    cl = pipe.classes
    if isinstance(prompts, (list, tuple)) and len(prompts) == 1 and prompts[0] == "all" or prompts == "all":
        if cl is None:
            raise ValueError(
                'the prompt "all" means every class of a class-conditional model; '
                "this model takes text prompts: give them"
            )
        return cl.labels
    prompts = check_prompts(prompts)
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
    cfg = pipe.config
    pixels = cfg.vae is None
    prompts = resolve_prompts(pipe, prompts)
    noise_samples = check_count("noise_samples", noise_samples)
    if dequant_samples is not None:
        dequant_samples = check_count("dequant_samples", dequant_samples)
    if batch_size is not None:
        batch_size = check_count("batch_size", batch_size)
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
    items = image_items(images)
    if len(items) > MAX_IMAGES:
        raise ValueError(f"{len(items)} images; at most {MAX_IMAGES} in one call (score them in several)")
    x, sizes = load_images(items, pipe.image_size(), resize)
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

    with pipe.exclusive():
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
