"""`python -m mlx_starflow.benchmark`: a shim kept for the entry point; the command lives in cli/benchmark.py."""

from .cli.benchmark import *  # noqa: F401,F403
from .cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
