"""`python -m mlx_starflow.generate`: a shim kept for the entry point; the command lives in cli/generate.py."""

from .cli.generate import *  # noqa: F401,F403
from .cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
