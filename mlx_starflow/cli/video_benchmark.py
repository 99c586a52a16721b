"""python -m mlx_starflow.benchmark --video: one latent frame of STARFlow-V measured on random weights, and a
clip estimated per precision (tools/video_benchmark.py; the memory: tools/video_memory.py).

    python -m mlx_starflow.benchmark --video --layers 2 --dtype float32 --vae-scale 8   # 7B shapes, 2 layers a block
    python -m mlx_starflow.benchmark --video --arch tiny
"""

import argparse
import sys

from ..images import write_json
from ..tools.video_benchmark import VIDEO_ARCHS, arch_shapes, estimate_clip, measure_frame, measure_text, summary_lines
from ..tools.video_memory import PRECISIONS, fit_table

STAGES = ("text", "deep", "shallow", "denoise", "decode")


def parser():
    p = argparse.ArgumentParser(
        prog="python -m mlx_starflow.benchmark --video",
        description="One latent frame of STARFlow-V (deep block with its KV cache, shallow blocks, self-denoiser, "
        "Wan2.2 VAE decode) timed on random weights, and a clip estimated per precision from the shapes.",
    )
    p.add_argument("--arch", default="7b", choices=list(VIDEO_ARCHS), help="the released 7B shapes or small ones")
    p.add_argument("--dtype", default="float32", choices=list(PRECISIONS), help="the flow's precision")
    p.add_argument(
        "--layers", type=int, default=None, help="build at most this many layers a block (7B: 2), extrapolate per layer"
    )
    p.add_argument("--frames", type=int, default=None, help="video frames of the clip (default: the training length)")
    p.add_argument("--frame", type=int, default=None, help="the latent frame measured (default: the last)")
    p.add_argument("--local-attn-window", type=int, default=None, help="the deep block's window, in latent frames")
    p.add_argument("--cfg", type=float, default=3.5, help="guidance (0: one row through the deep block)")
    p.add_argument("--tokens", type=int, default=4, help="tokens timed at each end of the frame")
    p.add_argument(
        "--vae-scale", type=int, default=1, help="7B: decode at the size divided by this, scale up by pixels"
    )
    p.add_argument("--stages", default="deep,shallow,denoise,decode", help=f"comma-separated, of {','.join(STAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every figure to this file")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(stages) - set(STAGES))
    if bad or args.tokens < 1 or args.vae_scale < 1 or (args.layers is not None and args.layers < 1):
        what = f"unknown stages {', '.join(bad)}" if bad else "--tokens, --vae-scale and --layers must be >= 1"
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
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "text" in stages:
        measured["stages"]["text"] = measure_text(args.arch, "float32" if args.dtype == "float32" else "bfloat16")
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
