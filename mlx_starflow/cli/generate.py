"""python -m mlx_starflow.generate --prompt "a cat playing piano"

Writes PNG files that carry their generation parameters in PNG text chunks
(read them back with `images.read_metadata`; `--from-image` makes the same image again).
Existing files are never overwritten unless --overwrite is given, and files are
written whole or not at all.
"""

import sys
from dataclasses import replace

from .. import distributed
from ..images import check_writable, output_paths, save
from ..options import expand_seeds
from . import edit
from .common import Bars, report, run_command
from .flags import parser, read_args, wants_edit  # noqa: F401 (parser: the command's, for its tests)


def main(argv=None):
    args = read_args(parser(), argv)
    if args is None:
        return 1
    if wants_edit(args):  # image to image: edit.run samples from the image's own noise
        return edit.run(args, variation=True)
    bars = Bars(not args.no_progress)

    def body():
        group = distributed.init()  # several processes under mlx.launch: rank 0 checks and writes the files
        count = len(args.prompts) * args.num_images
        seeds = distributed.broadcast_seeds(group, expand_seeds(args.seed, count))
        paths = output_paths(args.output, seeds, count)
        distributed.on_rank0(group, lambda: check_writable(paths, args.overwrite))
        pipe = distributed.load(group=group, pipeline_parallel=args.pipeline_parallel, **vars(args.load))
        result = pipe.generate(replace(args.options, seed=seeds), progress=bars)
        bars.close()
        if group is not None and group.rank() > 0:
            return 0
        save(result, paths, args.metadata, args.load.recorded())
        report(paths, result, args.verbose)
        return 0

    return run_command(body, bars)


if __name__ == "__main__":
    sys.exit(main())
