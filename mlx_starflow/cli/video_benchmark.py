"""python -m mlx_starflow.benchmark --video: one latent frame of STARFlow-V measured on random weights, and a
clip estimated per precision (tools/video_benchmark.py; the memory: tools/video_memory.py).

    python -m mlx_starflow.benchmark --video --layers 1 --vae-scale 4 --repeats 3   # 7B shapes, 1 layer a part: 3.2 GB
    python -m mlx_starflow.benchmark --video --arch tiny
"""

import argparse
import sys

from ..images import write_json
from ..tools.video_benchmark import (
    VIDEO_ARCHS,
    arch_shapes,
    estimate_clip,
    measure_frame,
    measure_load,
    measure_text,
    summary_lines,
)
from ..tools.video_memory import PRECISIONS, fit_table

STAGES = ("text", "load", "deep", "shallow", "denoise", "decode")


def parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_starflow.benchmark --video",
        description="One latent frame of STARFlow-V (deep block with its KV cache, shallow blocks, self-denoiser, "
        "Wan2.2 VAE decode) timed on random weights, and a clip estimated per precision from the shapes.",
    )
    p.add_argument("--arch", default="7b", choices=list(VIDEO_ARCHS), help="the released 7B shapes or small ones")
    p.add_argument("--dtype", default="float32", choices=list(PRECISIONS), help="the flow's precision")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="build at most this many layers a part (7B here: 1), extrapolate per layer",
    )
    p.add_argument("--frames", type=int, default=None, help="video frames of the clip (default: the training length)")
    p.add_argument("--frame", type=int, default=None, help="the latent frame measured (default: the last)")
    p.add_argument("--local-attn-window", type=int, default=None, help="the deep block's window, in latent frames")
    p.add_argument("--cfg", type=float, default=3.5, help="guidance (0: one row through the deep block)")
    p.add_argument("--tokens", type=int, default=4, help="tokens timed at each end of the frame")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each stage (the median is reported)")
    p.add_argument(
        "--vae-scale", type=int, default=1, help="7B: decode at the size divided by this, scale up by pixels"
    )
    p.add_argument(
        "--stages",
        default="deep,shallow,denoise,decode",
        help=f"comma-separated, of {','.join(STAGES)} (text: the T5 encoder, cut to --layers too; load: a converted "
        "folder of one deep layer read from disk, the command's weights scaled by bytes)",
    )
    p.add_argument("--tmp", help="load: the folder to write the weights in (default: the system's temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every figure to this file")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    small = min(args.tokens, args.vae_scale, args.repeats, 1 if args.layers is None else args.layers)
    if bad or small < 1:
        what = "--tokens, --vae-scale, --repeats and --layers must be >= 1"
        what = f"unknown stages {', '.join(bad)}" if bad else what
        print(f"error: {what}", file=sys.stderr)
        return 1
    try:
        measured = measure_frame(
            args.arch,
            args.dtype,
            args.layers,
            args.frames,
            args.frame,
            args.local_attn_window,
            args.cfg,
            args.tokens,
            args.vae_scale,
            stages,
            args.seed,
            repeats=args.repeats,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text_dtype = "float32" if args.dtype == "float32" else "bfloat16"
    if "text" in stages:
        measured["stages"]["text"] = measure_text(args.arch, text_dtype, layers=args.layers, repeats=args.repeats)
    if "load" in stages:
        measured["stages"]["load"] = measure_load(args.arch, args.dtype, args.seed, args.tmp)
    shapes = arch_shapes(args.arch)
    clip = estimate_clip(measured, shapes, window=args.local_attn_window)
    print("\n".join(summary_lines(measured, clip)))
    if args.arch == "7b":
        print("\n".join(fit_table(shapes)))
    if args.json:
        write_json(args.json, {"frame": measured, "clip": clip})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
