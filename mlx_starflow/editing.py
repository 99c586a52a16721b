"""Editing by exact inversion: image in, image out.

A normalizing flow inverts exactly: `sample.invert` gives the very noise from which
sampling, with the same prompt and guidance, gives an image's latents back. An edit
inverts the image under its source prompt, blends that noise with fresh noise,

    z' = sqrt(1 - s^2) z + s e        (variance preserving: z' stays standard normal)

(strength s: 0 keeps the image's own noise, 1 ignores the image), and samples z'
under the new prompt, then denoises and decodes as `generate` does. A variation is an
edit whose prompt is the source prompt.

With a mask (white = may change) only the tokens under it get the blended noise; the
others keep the source's noise, so the sample keeps the source's layout there and the
region it draws meets it. The whole sample is denoised, then the source's latents are
pasted back outside the mask (that region is the source's bit for bit). Pasting before
the score step fills the region with coloured noise: the joined latents are unlikely
under the flow, so the gradient of their log-density is large. Holding the kept tokens
at the source's values while sampling (teacher forcing, in every block or only the
last) was measured on the demo and follows the kept colour instead of the prompt
(16-24 of 30 red-to-blue half-mask edits blue, against 30 of 30 here).
"""

import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Generator, Iterator, List, Optional

import mlx.core as mx
import numpy as np
from PIL import Image

from .images import from_pil, image_items, load_images, mask_values
from .options import Event, GenerateOptions, Result, check_prompts, drive
from .sample import invert_steps, sampling_order

__all__ = ["invert", "edit", "edit_steps", "variation", "blend"]

# On the demo the colour follows the new prompt at every strength and the centre stays
# within a pixel (median) up to 0.3 (docs/demo.md).
DEFAULT_STRENGTH = 0.3


# -- inputs -------------------------------------------------------------------------------


def check_strength(strength) -> float:
    try:
        s = float(strength)
    except (TypeError, ValueError):
        s = math.nan
    if isinstance(strength, bool) or not (0.0 <= s <= 1.0):
        raise ValueError(
            f"strength must be a number in [0, 1] (0: the image's own noise, 1: fresh noise), not {strength!r}"
        )
    return s


def blend(z, noise, strength: float):
    """The variance-preserving blend sqrt(1 - s^2) z + s e of the inverted noise z and fresh noise."""
    s = check_strength(strength)
    if s == 0.0:
        return z
    if s == 1.0:
        return noise
    return math.sqrt(1.0 - s * s) * z + s * noise


def _sha256(item) -> str:
    """A file's sha256 (as `sha256sum` prints it); for an image in memory, of its pixel bytes."""
    if isinstance(item, (str, os.PathLike)):
        return hashlib.sha256(Path(item).read_bytes()).hexdigest()
    a = np.array(item) if isinstance(item, mx.array) else np.asarray(item)
    return hashlib.sha256(a.tobytes()).hexdigest()


def _file_name(item) -> Optional[str]:
    return Path(item).name if isinstance(item, (str, os.PathLike)) else None


@dataclass
class Sources:
    """The images to edit: pixels (B, H, W, 3) in [-1, 1] at the model's size, and per
    image its size as given (width, height), sha256 and file name (None in memory)."""

    pixels: mx.array
    sizes: List[tuple]
    sha256: List[str]
    names: List[Optional[str]]

    def params(self) -> dict:
        """What the PNG metadata records of them: one value, or a list when they differ."""

        def one(values):
            return values[0] if len(set(values)) == 1 else values

        out = {"source_sha256": one(self.sha256)}
        if any(self.names):
            out["source_file"] = one(self.names)
        return out


def load_sources(images, size) -> Sources:
    """Paths, PIL images or uint8 arrays (see score.load_images: resized to cover `size`
    (width, height) and centre-cropped; missing, unreadable, animated, grayscale or smaller
    images are refused with the reason)."""
    items = image_items(images)
    pixels, sizes = load_images(items, tuple(size))
    return Sources(pixels, sizes, [_sha256(i) for i in items], [_file_name(i) for i in items])


def load_mask(mask, sizes, size, pipe) -> tuple:
    """The mask for each source image (its size as given, (width, height)) -> (bool
    (B, h, w, 1) on the latent grid, True = may change; notes). A mask of another size
    than its image is resized to it (with a note), then resized and cropped as the image
    was; a token may change if any of its pixels is white."""
    white, label = mask_values(mask)
    cfg = pipe.config
    p, t = cfg.patch_size, cfg.pixels_per_latent * cfg.patch_size  # t: pixels per token side
    notes, rows = [], []
    for w, h in sizes:
        m = Image.fromarray(white.astype(np.uint8) * 255, mode="L")
        if m.size != (w, h):
            notes.append(f"{label} is {m.size[0]}x{m.size[1]}, its image {w}x{h}: resized to the image")
            m = m.resize((w, h), Image.Resampling.BILINEAR)
        px = np.array(from_pil(m, size=tuple(size), factor=1)[0, ..., 0]) > 0.0
        H, W = px.shape
        tok = px.reshape(H // t, t, W // t, t).any(axis=(1, 3))
        rows.append(np.repeat(np.repeat(tok, p, axis=0), p, axis=1)[..., None])
    return mx.array(np.stack(rows)), notes


# -- inversion ----------------------------------------------------------------------------


def _resolve(pipe, prompts: List[str], B: int, **options) -> GenerateOptions:
    """GenerateOptions for B images of the prompts (1 or B of them), checked and with
    the model's defaults, as `generate` would resolve them."""
    if len(prompts) not in (1, B):
        raise ValueError(f"{len(prompts)} prompts for {B} images: give one prompt, or one per image")
    return pipe.resolve_options(GenerateOptions(prompts, num_images=B // len(prompts), **options))


def invert(pipe, prompt, *, image=None, latents=None, guidance=None, negative_prompt: str = "") -> mx.array:
    """Images or latents -> the noise (B, H, W, C) that `pipe.generate(prompt, latents=noise,
    guidance=guidance, sampler="sequential", denoise="none")` maps back to them.

    latents: (B, H, W, C) as `generate` returns them; image: file path(s), PIL image(s)
    or uint8 arrays, resized to cover the model's size and centre-cropped, then
    VAE-encoded for STARFlow. One prompt, or one per image. guidance None: the model's
    default, as in `generate`."""
    if (image is None) == (latents is None):
        raise ValueError("give either image= or latents= to invert")
    prompts = check_prompts(prompt)
    with pipe.exclusive():
        if image is not None:
            h, w, _ = pipe.latent_shape()
            f = pipe.config.pixels_per_latent
            latents = pipe.encode_images(load_sources(image, (w * f, h * f)).pixels)
        x = latents if isinstance(latents, mx.array) else mx.array(latents)
        if x.ndim != 4:
            raise ValueError(f"latents must be (batch, height, width, channels), got shape {tuple(x.shape)}")
        f = pipe.config.pixels_per_latent
        # the sampler does not matter here: any model inverts (sequential is checked for none)
        opts = _resolve(
            pipe,
            prompts,
            x.shape[0],
            guidance=guidance,
            negative_prompt=negative_prompt,
            latents=x,
            height=x.shape[1] * f,
            width=x.shape[2] * f,
            sampler="sequential",
        )
        return _invert(pipe, opts)


def _invert_events(pipe, opts: GenerateOptions) -> Generator[Event, None, mx.array]:
    """The guided inverse of opts.latents under opts' prompts and guidance, with an "invert"
    event before the first block and after each (a caller stops between blocks); returns
    the noise."""
    y, _ = pipe.conditioning(opts.batch_prompts, opts.negative_prompt, opts.guidance > 0)
    yield Event("invert", 0, len(sampling_order(pipe.flow)))
    steps = invert_steps(pipe.flow, opts.latents, y, opts.guidance)
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        yield Event("invert", done, total)


def _invert(pipe, opts: GenerateOptions) -> mx.array:
    events = _invert_events(pipe, opts)
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


# -- editing ------------------------------------------------------------------------------


def _timed(events: Iterator[Event], timings: dict) -> Iterator[Event]:
    """Pass the events on, adding the time spent producing each to its stage (not the
    consumer's time between them)."""
    t = time.perf_counter()
    for event in events:
        timings[event.stage] = timings.get(event.stage, 0.0) + time.perf_counter() - t
        yield event
        t = time.perf_counter()


def edit_steps(
    pipe,
    image,
    prompt,
    *,
    source_prompt="",
    strength: float = DEFAULT_STRENGTH,
    mask=None,
    notes: Optional[Callable] = None,
    **options,
) -> Iterator[Event]:
    """The edit as a generator of Events ("encode", "invert", then generate's stages); the
    last carries the Result. prompt: a prompt, a list, or a GenerateOptions; options:
    GenerateOptions' fields but latents. Everything is checked before the first event
    (images, mask, strength, options); stop iterating to cancel. See `edit`."""
    s = check_strength(strength)
    unknown = sorted(set(options) - set(GenerateOptions.names()) | ({"latents"} & set(options)))
    if unknown:
        raise TypeError(
            f"unknown edit option(s) {', '.join(unknown)}; known: source_prompt, strength, mask, "
            f"{', '.join(n for n in GenerateOptions.names()[1:] if n != 'latents')}"
        )
    opts = prompt if isinstance(prompt, GenerateOptions) else GenerateOptions(prompt, **options)
    if opts.latents is not None:
        raise ValueError("an edit starts from its image's noise: give no latents")
    opts = pipe.resolve_options(opts)  # checks everything generate checks, fills the model's defaults
    prompts, sources = opts.prompts, check_prompts(source_prompt)
    src = load_sources(image, (opts.width, opts.height))
    B = len(opts.batch_prompts)
    if len(sources) == len(prompts):  # one per prompt, as the prompts are repeated
        sources = [p for p in sources for _ in range(opts.num_images)]
    if len(src.sizes) not in (1, B) or len(sources) not in (1, B):
        raise ValueError(
            f"{len(src.sizes)} images and {len(sources)} source prompts for {B} edits "
            f"({len(prompts)} prompts x {opts.num_images}): give one of each, or one per edit"
        )
    sources = sources * B if len(sources) == 1 else sources
    pipe.check_prompts(sources)
    params = {
        "operation": "variation" if sources == opts.batch_prompts else "edit",
        "source_prompt": sources[0] if len(set(sources)) == 1 else sources,
        "strength": s,
        **src.params(),
    }
    keep = None
    if mask is not None:
        keep, mask_notes = load_mask(mask, src.sizes, (opts.width, opts.height), pipe)
        for note in mask_notes:
            (notes or (lambda m: warnings.warn(m, stacklevel=3)))(note)
        params["mask_sha256"] = _sha256(mask)
        if _file_name(mask):
            params["mask_file"] = _file_name(mask)
    pixels = src.pixels if src.pixels.shape[0] == B else mx.repeat(src.pixels, B, axis=0)
    return _edit(pipe, opts, pixels, sources, s, keep, params)


def _edit(pipe, opts, pixels, sources, strength, keep, params) -> Iterator[Event]:
    timings = {}
    with pipe.exclusive(keep_text_encoder=True):  # one text encoder load for the source and target prompts
        mx.reset_peak_memory()
        events = _timed(_edit_stages(pipe, opts, pixels, sources, strength, keep), timings)
        for event in events:
            if event.result is not None:
                r = event.result
                r.params = {**r.params, **params}
                r.seeds, r.timings = list(opts.seed), dict(timings)
                r.peak_memory = max(r.peak_memory, mx.get_peak_memory())
            yield event


def _edit_stages(pipe, opts, pixels, sources, strength, keep) -> Iterator[Event]:
    fresh = pipe.noise(opts.seed, pipe.latent_shape(opts.height, opts.width))
    paste = None
    if strength == 1.0 and keep is None:  # fresh noise only: the image is not needed
        noise = fresh
    else:
        yield Event("encode", 0, 1)
        x = pipe.encode_images(pixels)
        yield Event("encode", 1, 1)
        z = yield from _invert_events(pipe, replace(opts, prompts=sources, num_images=1, latents=x))
        noise = blend(z, fresh, strength)
        if keep is not None:
            # The whole image is sampled (and denoised) as one; the kept tokens start from
            # the source's own noise, so the sample keeps its layout there, and the source's
            # latents replace them only at the end.
            noise = mx.where(keep, noise, z)
            paste = lambda v: mx.where(keep, v, x)  # noqa: E731
    peak = mx.get_peak_memory()
    run = replace(opts, latents=noise, seed=None)
    for event in pipe.generate_steps(run, after_sampling=paste):
        if event.result is not None:
            event.result.peak_memory = max(event.result.peak_memory, peak)
        yield event


def edit(pipe, image, prompt, *, progress: Optional[Callable] = None, **options) -> Result:
    """Edit image(s) towards prompt by exact inversion; returns generate's Result (images,
    latents, seeds, params with the edit's own: source_prompt, strength, the source's
    sha256, the mask's).

    image: file path(s), PIL image(s) or uint8 arrays (H, W, 3), resized to cover the
    model's size and centre-cropped (score.load_images); one image for every edit, or
    one each (B = prompts x num_images).
    source_prompt: what the image shows, the prompt it is inverted under ("" by default).
    strength: 0 keeps the image's own noise, 1 fresh noise from `seed`.
    mask: a black and white image (path, PIL or (H, W) array), white = may change; the
    rest of the latents are the source's exactly. A mask of another size is resized to
    the image's with a note (warnings.warn, or `notes(message)`).
    Other options as generate's: negative_prompt, guidance, seed, num_images, sampler,
    jacobi_*, denoise, height, width. progress(stage, done, total) as in generate:
    returning False cancels (raises Cancelled)."""
    return drive(edit_steps(pipe, image, prompt, **options), progress)


def variation(pipe, image, prompt, strength: float = DEFAULT_STRENGTH, **options) -> Result:
    """Image to image under the same prompt: an edit whose source prompt is the prompt."""
    return edit(pipe, image, prompt, source_prompt=prompt, strength=strength, **options)
