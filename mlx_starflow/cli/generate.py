"""python -m mlx_starflow.generate --prompt "a cat playing piano"

Writes PNG files that carry their generation parameters in PNG text chunks
(read them back with `images.read_metadata`; `--from-image` makes the same image again).
Existing files are never overwritten unless --overwrite is given, and files are
written whole or not at all.
"""

import sys

from .. import distributed, options
from ..images import check_writable, output_paths, save
from ..options import batches, expand_seeds
from . import edit, video
from .common import (
    Bars,
    blas_note_once,
    command_line,
    one_shot,
    prefer_openblas,
    report,
    run_command,
    say_precision,
    unwrite,
)
from .flags import parser, read_args, wants_edit  # noqa: F401 (parser: the command's, for its tests)


def main(argv=None):
    if argv is None:  # the command line: first, OpenBLAS where MLX would run its reference BLAS
        argv = prefer_openblas(sys.argv[1:])
    if video.wanted(argv):  # --frames, --fps, --from-video, or a video model: a clip (cli/video.py)
        return video.main(argv)
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
        distributed.on_rank0(group, lambda: check_writable(paths, args.overwrite, args.metadata))
        load = one_shot(args.load) if group is None else args.load  # a group's ranks load at once
        pipe = distributed.load(group=group, pipeline_parallel=args.pipeline_parallel, **vars(load))
        if group is None or group.rank() == 0:
            say_precision(pipe, args.verbose)
            blas_note_once(command_line("generate"))
        writer = group is None or group.rank() == 0
        written = []
        try:
            # At most MAX_BATCH images in one call: a large count runs batch after batch (each
            # image depends on its prompt and seed only; Jacobi decides convergence per batch).
            for part in batches(args.options, seeds, options.MAX_BATCH):
                result = pipe.generate(part.options, progress=bars)
                bars.close()
                if writer:
                    save(result, [paths[i] for i in part.indices], args.metadata, args.load.recorded())
                    written += [paths[i] for i in part.indices]
                    report([paths[i] for i in part.indices], result, args.verbose)
        except BaseException:
            if written:
                unwrite(written, args.metadata, args.keep_partial)
            raise
        return 0

    return run_command(body, bars)


if __name__ == "__main__":
    sys.exit(main())
