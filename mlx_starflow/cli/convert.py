"""Command lines of the converters (convert/starflow.py, convert/tarflow.py, or
`python -m mlx_starflow.convert {starflow,tarflow} ...`)."""

import argparse
import sys

from ..loading.quant import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES
from ..loading.torch_reader import CheckpointError
from ..loading.weights import DTYPES, WeightsError, convert_starflow, convert_tarflow
from ..models.config import ConfigError


def _quant(args):
    if not args.quantize:
        return None
    return {"bits": args.q_bits, "group_size": args.q_group_size}


def starflow_parser():
    p = argparse.ArgumentParser(description="Convert a reference STARFlow checkpoint (.pth + YAML config) to MLX.")
    p.add_argument("--checkpoint", required=True, help="the reference .pth state dict")
    p.add_argument("--config", required=True, help="the reference YAML config (arguments: list)")
    p.add_argument("--out", required=True, help="the MLX model folder to write")
    p.add_argument(
        "--vae",
        metavar="FOLDER",
        default=None,
        help="the VAE's diffusers folder: its config sets the latent grid (needed unless the "
        "config's VAE is an SD-VAE, 8 pixels per latent)",
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the transformer linear layers")
    p.add_argument("--q-bits", type=int, default=4, choices=BITS)
    p.add_argument("--q-group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES)
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    return p


def tarflow_parser():
    p = argparse.ArgumentParser(
        description="Convert an apple/ml-tarflow checkpoint (.pth) to MLX; the architecture is read from the weights."
    )
    p.add_argument("--checkpoint", required=True, help="the reference .pth state dict")
    p.add_argument("--out", required=True, help="the MLX model folder to write")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--in-channels", type=int, default=3, help="image channels (3 for RGB)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head size (64 in apple/ml-tarflow)")
    p.add_argument(
        "--noise-std",
        type=float,
        default=None,
        help="training noise level (default: read from a file name ending _<noise>.pth)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    return p


def _run(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except (ConfigError, CheckpointError, WeightsError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


def starflow_main(argv=None):
    a = starflow_parser().parse_args(argv)
    return _run(
        convert_starflow, a.checkpoint, a.config, a.out, dtype=a.dtype, force=a.force, quantize=_quant(a), vae=a.vae
    )


def tarflow_main(argv=None):
    a = tarflow_parser().parse_args(argv)
    return _run(
        convert_tarflow,
        a.checkpoint,
        a.out,
        dtype=a.dtype,
        force=a.force,
        in_channels=a.in_channels,
        noise_std=a.noise_std,
        head_dim=a.head_dim,
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("starflow", "tarflow"):
        print("usage: python -m mlx_starflow.convert {starflow,tarflow} [options]", file=sys.stderr)
        return 2
    return (starflow_main if argv[0] == "starflow" else tarflow_main)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
