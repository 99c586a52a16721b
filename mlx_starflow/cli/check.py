"""python -m mlx_starflow.check: every model path on this machine's default device (Metal on a
Mac, CUDA where MLX has it) and again on MLX's CPU, as one table to paste into an issue (the
cases: tools/check.py)."""

import sys

from ..tools.check import run_check, table
from .common import new_parser, run_command


def parser():
    p = new_parser(
        "check",
        "A self-check: the shipped demo and tiny random models of every path (sampling token by token and "
        "in Jacobi chunks with guidance, 8-bit weights, the 8-bit KV cache, score, inversion, the score "
        "step, T5, Gemma, the SD-VAE) on the default device and on the CPU, with the largest difference "
        "of each, the demo's images per second and the peak memory. Paste the table into an issue.",
    )
    p.add_argument("--images", type=int, default=8, metavar="N", help="demo images per timed batch (images per second)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.images < 1:
        print("error: --images must be at least 1", file=sys.stderr)
        return 1

    def body():
        report = run_check(args.images, log=lambda s: print(s, file=sys.stderr, flush=True))
        print("\n".join(table(report)))
        return 0 if report.ok else 2

    return run_command(body, nothing="nothing was checked")


if __name__ == "__main__":
    sys.exit(main())
