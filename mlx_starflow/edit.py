"""Editing by exact inversion: image in, image out.

    python -m mlx_starflow.edit --model demo --image red.png --source-prompt "red circle" \\
        --prompt "blue circle" --strength 0.5

A normalizing flow inverts exactly: `sample.invert` gives the very noise from which
sampling, with the same prompt and guidance, gives an image's latents back. An edit
inverts the image under its source prompt, blends that noise with fresh noise,

    z' = sqrt(1 - s^2) z + s e        (variance preserving: z' stays standard normal)

(strength s: 0 keeps the image's own noise, 1 ignores the image), and samples z'
under the new prompt, then denoises and decodes as `generate` does. With a mask
(white = may change) only the tokens under it get the blended noise; after sampling
the latents outside it are pasted back, so that region is the source's bit for bit in
latent space. A variation is an edit whose prompt is the source prompt.
"""

import hashlib
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import mlx.core as mx
import numpy as np

from .pipeline import Event, GenerateOptions, Result, check_prompts, drive
from .sample import invert as flow_invert
from .sample import sampling_order

__all__ = ["invert", "edit", "edit_steps", "variation", "blend", "invert_stage", "main"]

# On the demo the colour follows the new prompt at every strength and the centre stays
# within a pixel (median) up to 0.3 (docs/demo.md).
DEFAULT_STRENGTH = 0.3
# A mask is black (keep) and white (may change); resampling and compression blur its
# edges, so this share of its pixels may be grey (between MASK_LOW and MASK_HIGH).
MASK_GREY = 0.05
MASK_LOW, MASK_HIGH = 0.2, 0.8


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
    from .score import _items, load_images

    items = _items(images)
    pixels, sizes = load_images(items, tuple(size))
    return Sources(pixels, sizes, [_sha256(i) for i in items], [_file_name(i) for i in items])


def _read_mask(mask) -> tuple:
    """A mask (path, PIL image, or (H, W) array of 0..1 or bool) -> (values (H, W, C) in
    [0, 1], label for messages)."""
    from PIL import Image, UnidentifiedImageError

    label = f"mask {mask}" if isinstance(mask, (str, os.PathLike)) else "mask"
    if isinstance(mask, (mx.array, np.ndarray)):
        a = np.array(mask, dtype=np.float32)
        return (a if a.ndim == 3 else a[..., None]), label
    if isinstance(mask, (str, os.PathLike)):
        if not Path(mask).is_file():
            raise ValueError(f"{label}: no such file")
        try:
            img = Image.open(mask)
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read {label} as an image ({e}); give a black and white PNG") from None
    elif isinstance(mask, Image.Image):
        img = mask
    else:
        raise ValueError(f"mask must be a path, a PIL image or an (height, width) array, not {type(mask).__name__}")
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"{label} is animated ({img.n_frames} frames); give a single black and white image")
    if img.mode in ("P", "1", "RGBA", "LA", "PA", "La", "RGBa"):  # alpha does not mark the region; the colour does
        img = img.convert("RGB" if img.mode in ("P", "RGBA", "PA", "RGBa") else "L")
    top = {"L": 255.0, "RGB": 255.0, "I": 65535.0, "I;16": 65535.0, "F": 1.0}.get(img.mode)
    if top is None:
        raise ValueError(f"{label} is a {img.mode} image, not a mask; give a black and white image")
    a = np.asarray(img, dtype=np.float32) / top
    return (a if a.ndim == 3 else a[..., None]), label


def mask_values(mask) -> tuple:
    """A mask -> (bool (H, W), white = True (may change); its label for messages). It must be (nearly) black and
    white: at most MASK_GREY of its pixels may be grey (between MASK_LOW and MASK_HIGH)
    or coloured (black in one channel, white in another), else ValueError."""
    a, label = _read_mask(mask)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{label} must be (height, width) or (height, width, 3), got shape {a.shape}")
    grey = ((a > MASK_LOW) & (a < MASK_HIGH)).any(-1)
    mixed = (a >= 0.5).any(-1) != (a >= 0.5).all(-1)
    unclear = float((grey | mixed).mean())
    if unclear > MASK_GREY:
        raise ValueError(
            f"{label} is not a mask: {unclear:.0%} of its pixels are neither black nor white "
            f"(at most {MASK_GREY:.0%} may be, at blurred edges). A mask is white where the "
            f"image may change and black where it must stay"
        )
    return a.mean(-1) >= 0.5, label


def load_mask(mask, sizes, size, pipe) -> tuple:
    """The mask for each source image (its size as given, (width, height)) -> (bool
    (B, h, w, 1) on the latent grid, True = may change; notes). A mask of another size
    than its image is resized to it (with a note), then resized and cropped as the image
    was; a token may change if any of its pixels is white."""
    from PIL import Image

    from .vae import from_pil

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
    with pipe._lock:
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


def _invert(pipe, opts: GenerateOptions) -> mx.array:
    """The guided inverse of opts.latents under opts' prompts and guidance."""
    y, _ = pipe.conditioning(opts.batch_prompts, opts.negative_prompt, opts.guidance > 0)
    z = flow_invert(pipe.flow, opts.latents, y, opts.guidance)
    mx.eval(z)
    return z


# -- editing ------------------------------------------------------------------------------


@contextmanager
def _text_encoder_kept(pipe):
    """Keep the text encoder loaded across the source and target prompts (one load per edit)."""
    keep = pipe.keep_text_encoder
    pipe.keep_text_encoder = True
    try:
        yield
    finally:
        pipe.keep_text_encoder = keep
        pipe._release_text()


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
    with pipe._lock, _text_encoder_kept(pipe):
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
    if strength == 1.0 and keep is None:  # fresh noise only: the image is not needed
        noise = fresh
    else:
        yield Event("encode", 0, 1)
        x = pipe.encode_images(pixels)
        yield Event("encode", 1, 1)
        yield Event("invert", 0, 1)
        z = _invert(pipe, replace(opts, prompts=sources, num_images=1, latents=x))
        yield Event("invert", 1, 1)
        noise = blend(z, fresh, strength)
        if keep is not None:
            noise = mx.where(keep, noise, z)
    peak = mx.get_peak_memory()
    run = replace(opts, latents=noise, seed=None)
    # Masked: the kept latents are pasted back after sampling and after denoising, so
    # the kept region stays the source's exactly.
    paste = None if keep is None else (lambda v: mx.where(keep, v, x))
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


# -- benchmark ----------------------------------------------------------------------------


def invert_stage(
    flow, y=None, guidance: float = 0.0, *, batch: int = 1, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict:
    """The benchmark's `invert` stage: the guided inversion `edit` runs (one parallel pass
    per block, no token loop) on random latents of the flow's own shape. y as
    sample.invert takes it for `batch` images (2 x batch rows [conditional; unconditional]
    when guidance > 0 for text models; class ids for TarFlow). The VAE encoding is not
    included. Returns the batch, tokens per image, blocks, seconds per call (median, min,
    max), tokens per second and MLX's peak memory (weights included)."""
    import statistics

    from .machine import times

    cfg = flow.config
    x = mx.random.normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels), key=mx.random.key(seed))
    mx.eval(x, *([] if y is None else [y]))
    mx.reset_peak_memory()
    ts = times(lambda: mx.eval(flow_invert(flow, x, y, guidance)), repeats, warmup)
    med = statistics.median(ts)
    h, w = flow.grid(x)
    return {
        "batch": batch,
        "tokens": h * w,
        "blocks": len(sampling_order(flow)),
        "seconds": {"median": med, "min": min(ts), "max": max(ts), "n": len(ts)},
        "tokens_per_second": batch * h * w / med,
        "peak_memory": mx.get_peak_memory(),
    }


# -- the command line ---------------------------------------------------------------------


def add_options(p):
    """The editing options, shared by `edit` and `generate --init-image` (a variation)."""
    g = p.add_argument_group("editing by exact inversion")
    g.add_argument(
        "--image",
        "--init-image",
        dest="image",
        metavar="IMAGE",
        default=None,
        help="the image to edit, resized to cover the model's size and centre-cropped (required by "
        "edit; generate's default: none, fresh noise; with one, a variation of it under the prompt)",
    )
    g.add_argument(
        "--source-prompt",
        metavar="P",
        default=None,
        help="what the image shows: it is inverted to its noise under this prompt (default: empty "
        "for edit; the prompt itself for generate --init-image)",
    )
    g.add_argument(
        "--strength",
        metavar="S",
        type=float,
        default=None,
        help=f"0 keeps the image's own noise (the closest edit), 1 draws fresh noise from the seed "
        f"(ignores the image); blended as sqrt(1 - s^2) z + s e (default: {DEFAULT_STRENGTH})",
    )
    g.add_argument(
        "--mask",
        metavar="IMAGE",
        default=None,
        help="black and white image, white where the image may change: the rest is kept exactly "
        "(in latent space); resized to the image if its size differs (default: none, all may change)",
    )


def wants_edit(args) -> bool:
    """Whether a `generate` command line asks for an image edit (a variation)."""
    return any(getattr(args, k, None) is not None for k in ("image", "source_prompt", "strength", "mask"))


def parser():
    from .generate import parser as generate_parser

    p = generate_parser()
    if "--image" not in p._option_string_actions:
        add_options(p)
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    p.prog = "mlx-starflow-edit" if name.startswith("mlx-starflow-") else "python -m mlx_starflow.edit"
    p.description = (
        "Edit an image with STARFlow on MLX by exact inversion: the image is inverted to its noise "
        "under --source-prompt, blended with fresh noise by --strength and sampled under --prompt."
    )
    p.set_defaults(output="edit-{seed}.png")
    return p


def run(args, variation: bool = False) -> int:
    """Edit as the command line asks (parsed by `parser`); the exit status. For
    `generate --init-image`, variation: the source prompt is the prompt."""
    from . import distributed
    from .generate import Bars, check_writable, load_options, loaded_with, output_paths, report, run_command, save
    from .pipeline import Pipeline, expand_seeds
    from .score import open_image

    def note(message):
        print(f"note: {message}", file=sys.stderr, flush=True)

    bars = Bars(not args.no_progress)

    def body():
        if args.image is None:
            raise ValueError(
                "--init-image: give the image to start from (--strength, --source-prompt and --mask vary an image)"
                if variation
                else "--image: give the image to edit"
            )
        if getattr(args, "pipeline_parallel", False) or distributed.launched():
            raise ValueError("editing runs on one machine: run it without mlx.launch (and --pipeline-parallel)")
        strength = check_strength(DEFAULT_STRENGTH if args.strength is None else args.strength)
        # Unreadable files, wrong modes and masks that are not masks fail before the model is loaded.
        open_image(args.image)
        if args.mask is not None:
            mask_values(args.mask)
        count = len(args.prompt) * args.num_images
        seeds = expand_seeds(args.seed, count)
        paths = output_paths(args.output, seeds, count)
        check_writable(paths, args.overwrite)
        pipe = Pipeline.from_pretrained(**load_options(args))
        source = args.source_prompt if args.source_prompt is not None else args.prompt if variation else ""
        result = edit(
            pipe,
            args.image,
            replace(args.options, seed=seeds),
            source_prompt=source,
            strength=strength,
            mask=args.mask,
            progress=bars,
            notes=note,
        )
        bars.close()
        save(result, paths, args.metadata, loaded_with(args))
        report(paths, result, args.verbose)
        return 0

    return run_command(body, bars)


def main(argv=None) -> int:
    from .generate import read_args

    args = read_args(parser(), argv)
    return 1 if args is None else run(args)


if __name__ == "__main__":
    sys.exit(main())
