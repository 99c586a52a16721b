"""python -m mlx_starflow.score: the exact likelihood (score.py) from the command line.

python -m mlx_starflow.score --model demo --image a.png b.png --prompt all [--json out.json]
"""

import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..images import atomic_write, check_writable, open_image
from ..likelihood import COUNTS, LATENT_NOTE, MAX_IMAGES, ScoreResult, check_count
from ..pipeline import Pipeline
from .common import (
    Bars,
    add_load_options,
    load_options,
    new_parser,
    one_shot,
    prefer_openblas,
    run_command,
    say_precision,
)

# Scoring decodes nothing: no VAE tiling.
SKIP = ("vae_tile",)


def parser():
    p = new_parser(
        "score",
        "The exact likelihood of images under prompts, in bits per dimension (lower: more likely), "
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
    add_load_options(p, skip=SKIP)  # the same loading options as generate
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
    if argv is None:
        argv = prefer_openblas(sys.argv[1:])
    args = parser().parse_args(argv)
    bars = Bars(not args.no_progress)

    def body():
        for name in COUNTS:  # the library's limits, checked before the model loads
            if getattr(args, name) is not None:
                try:
                    check_count(name, getattr(args, name))
                except ValueError as e:
                    raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        if len(args.image) > MAX_IMAGES:
            raise ValueError(f"--image: {len(args.image)} images; at most {MAX_IMAGES} in one run")
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
        pipe = Pipeline.from_pretrained(**vars(one_shot(load_options(args, skip=SKIP))))
        say_precision(pipe)
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
