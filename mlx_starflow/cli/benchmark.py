"""python -m mlx_starflow.benchmark: how long one image takes and how much memory it needs,
stage by stage (the stages themselves: tools/benchmark.py).

    python -m mlx_starflow.benchmark                          # the 3B model as generate runs it
    python -m mlx_starflow.benchmark --dtype float32 --tokens 4 --json f32.json
    python -m mlx_starflow.benchmark --quantize 4 --stages load,deep,shallow
    python -m mlx_starflow.benchmark --model path/to/converted
"""

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..images import write_json
from ..loading.precision_policy import text_follows
from ..options import GenerateOptions, LoadOptions
from ..tools.benchmark import (
    AUTO_BLOCK,
    AUTO_DENOISE,
    AUTO_TOKENS,
    EXTRA_STAGES,
    STAGES,
    print_summary,
    run_benchmark,
)
from ..tools.random_models import ARCHS
from .common import add_fields, load_options, new_parser, prefer_openblas, run_command
from .video_benchmark import main as video_main

# The loading options the benchmark takes (its model is random weights or a converted folder).
LOAD = ("dtype", "quantize", "q_group_size", "text_dtype", "text_quantize", "vae_dtype", "vae_tile")
SKIP = tuple(n for n in LoadOptions.names() if n not in LOAD)


def parser():
    p = new_parser(
        "benchmark",
        "How long one image takes and how much memory it needs, stage by stage, beside what "
        "the machine can do. Without --model: random weights of the released 3B shapes.",
        epilog="The defaults are generate's for the released 3B model (bfloat16 flow, float32 text encoder "
        "and VAE, guidance 3.6), except the sampler: generate samples in Jacobi chunks, whose number "
        "of iterations depends on the trained weights (random weights cannot tell it); the sequential "
        "loop costs the same per token for any weights, so it is what is measured (--sampler jacobi "
        "with --model measures the real one). Figures and commands: BENCHMARKS.md.",
    )
    p.add_argument("--model", help="a converted model folder instead of random weights")
    p.add_argument(
        "--group-images",
        type=int,
        metavar="N",
        default=None,
        help="under mlx.launch: generate N images over the group with --model (a name generate takes, "
        "e.g. demo) and report each rank's images and seconds and the group's images per minute",
    )
    p.add_argument(
        "--arch",
        default="3b",
        choices=list(ARCHS),
        help="architecture of the random model: the released 3B, or small ones for quick checks",
    )
    # generate's loading options, at the defaults generate picks for the 3B (bfloat16 flow)
    add_fields(p, LoadOptions, only=LOAD, defaults={"dtype": "bfloat16"})
    p.add_argument("--model-dtype", action="store_true", help="with --model: cast its weights to --dtype")
    p.add_argument("--batch", type=int, default=1, help="images at once")
    add_fields(
        p,
        GenerateOptions,
        only=("guidance", "sampler", "kv_bits"),
        defaults={"guidance": 3.6, "sampler": "sequential"},
    )
    p.add_argument(
        "--tokens",
        default="auto",
        metavar="{auto,all,N}",
        help="tokens timed at each end of a block, then extrapolated; 'all': whole blocks and every "
        f"stage run; 'auto': whole blocks when the first token says under {AUTO_BLOCK:.0f} s, "
        f"else {AUTO_TOKENS} tokens; with auto or N, a denoising step estimated over {AUTO_DENOISE / 60:.0f} min "
        "runs up to the deep block's top layer's backward pass (its peak) and its time is extrapolated",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each stage (the median is reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs of the text, VAE and denoise stages first (0: a slow stage measured once)",
    )
    p.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run (load always runs); also score (the exact likelihood: one "
        "density pass per image) and invert (editing's exact guided inversion)",
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "out-in"],
        help="auto: as the pipeline holds the weights (device.prepare: float32 input-major on a CPU); "
        "out-in: as stored, to measure the difference",
    )
    p.add_argument(
        "--compare-loop",
        action="store_true",
        help="also time the deep block's token loop with and without overlap and mx.compile",
    )
    p.add_argument(
        "--compare-precisions",
        dest="precision",
        action="store_true",
        help="also compare each component's precisions with float32 on a small architecture",
    )
    p.add_argument("--precision-arch", choices=list(ARCHS), help="its architecture (default: small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (0 unless given)")
    p.add_argument("--json", help="also write every figure to this file")
    return p


def _check(p, args):
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(args.stages) - set(STAGES) - set(EXTRA_STAGES))
    if bad:
        raise ValueError(f"--stages: unknown {', '.join(bad)}; choose from {','.join(STAGES + EXTRA_STAGES)}")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be at least 0")
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    try:
        GenerateOptions("x", guidance=args.guidance, sampler=args.sampler).validate()
    except ValueError as e:
        raise ValueError(f"--{'cfg' if e.option == 'guidance' else e.option}: {e}") from None
    load_options(argparse.Namespace(**{**vars(args), "model": None}), skip=SKIP)
    if args.dtype == "auto":  # as generate's auto for the 3B: bfloat16 above a billion float32 parameters
        args.dtype = "bfloat16"
    if args.text_dtype == "auto" and args.text_quantize is None:  # as generate's: it follows the flow
        args.text_dtype, args.text_quantize = text_follows(args.dtype, args.quantize, stored_float32=True)
    elif args.text_dtype == "auto":
        args.text_dtype = "float32"
    if args.tokens in ("auto", "all"):
        args.tokens_n = AUTO_TOKENS
    else:
        try:
            args.tokens_n = int(args.tokens)
        except ValueError:
            args.tokens_n = 0
        if args.tokens_n < 1:
            raise ValueError(f"--tokens must be auto, all or a number >= 1, not {args.tokens!r}")
    if args.model and not Path(args.model).is_dir():
        raise ValueError(f"--model: {args.model} is not a folder")


def group_benchmark(args, log=print) -> dict:
    """Batch-parallel generation timed over the launcher's group (distributed.throughput):
    every rank loads --model and takes its share of --group-images images."""
    results = {}

    def body():
        group = distributed.init()
        if group is None:
            raise ValueError("--group-images: start the benchmark with mlx.launch (several processes)")
        pipe = distributed.load(
            args.model, group, dtype=args.dtype if args.model_dtype else None, quantize=args.quantize
        )
        prompt = pipe.classes.labels[0] if pipe.classes is not None else "a photograph of a cat"
        options = {"guidance": args.guidance, "sampler": args.sampler}
        distributed.throughput(pipe, group, [prompt], num_images=1, seed=args.seed, **options)  # warm-up
        t = distributed.throughput(pipe, group, [prompt], num_images=args.group_images, seed=args.seed, **options)
        results.update(t, ranks_in_group=group.size(), rank=group.rank())
        if group.rank() == 0:
            for r in t["ranks"]:
                log(f"rank {r['rank']}: {r['images']} images in {r['seconds']:.2f} s")
            log(
                f"group of {group.size()}: {t['images']} images in {t['seconds']:.2f} s, "
                f"{t['images_per_minute']:.1f} images per minute"
            )
        return 0

    return results if run_command(body, nothing="nothing was measured") == 0 else None


def main(argv=None):
    argv = prefer_openblas(sys.argv[1:]) if argv is None else list(argv)
    if "--video" in argv:  # one video frame measured, a clip estimated (cli/video_benchmark.py)
        return video_main([a for a in argv if a != "--video"])
    p = parser()
    args = p.parse_args(argv)
    if args.group_images is not None:
        if not args.model or args.group_images < 1:
            print("error: --group-images needs --model (e.g. demo) and at least 1 image", file=sys.stderr)
            return 1
        results = group_benchmark(args)
        if results is None:
            return 1
        if args.json and results["rank"] == 0:
            write_json(args.json, results)
        return 0
    try:
        _check(p, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = run_benchmark(args)
    print_summary(results)
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
