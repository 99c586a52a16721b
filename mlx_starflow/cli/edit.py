"""python -m mlx_starflow.edit: editing by exact inversion (edit.py) from the command line.

    python -m mlx_starflow.edit --model demo --image red.png --source-prompt "red circle" \\
        --prompt "blue circle" --strength 0.5
"""

import sys
from dataclasses import replace

from .. import distributed, editing
from ..images import check_writable, mask_values, open_image, output_paths, save
from ..options import expand_seeds
from ..pipeline import Pipeline
from . import flags
from .common import Bars, one_shot, prefer_openblas, report, run_command, say_precision


def parser():
    p = flags.parser(
        "edit",
        "Edit an image with STARFlow on MLX by exact inversion: the image is inverted to its noise "
        "under --source-prompt, blended with fresh noise by --strength and sampled under --prompt.",
    )
    p.set_defaults(output="edit-{seed}.png")
    return p


def run(args, variation: bool = False) -> int:
    """Edit as the command line asks (parsed by `parser`); the exit status. For
    `generate --init-image`, variation: the source prompt is the prompt."""

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
        strength = editing.check_strength(editing.DEFAULT_STRENGTH if args.strength is None else args.strength)
        # Unreadable files, wrong modes and masks that are not masks fail before the model is loaded.
        open_image(args.image)
        if args.mask is not None:
            mask_values(args.mask)
        count = len(args.prompts) * args.num_images
        seeds = expand_seeds(args.seed, count)
        paths = output_paths(args.output, seeds, count)
        check_writable(paths, args.overwrite, args.metadata)
        pipe = Pipeline.from_pretrained(**vars(one_shot(args.load)))
        say_precision(pipe, args.verbose)
        source = args.source_prompt if args.source_prompt is not None else args.prompts if variation else ""
        result = editing.edit(
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
        save(result, paths, args.metadata, args.load.recorded())
        report(paths, result, args.verbose)
        return 0

    return run_command(body, bars)


def main(argv=None) -> int:
    if argv is None:
        argv = prefer_openblas(sys.argv[1:])
    args = flags.read_args(parser(), argv)
    return 1 if args is None else run(args)


if __name__ == "__main__":
    sys.exit(main())
