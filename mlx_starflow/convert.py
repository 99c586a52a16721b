"""`python -m mlx_starflow.convert`: a shim kept for the entry point; the command lives in cli/convert.py."""

from .cli.convert import *  # noqa: F401,F403
from .cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
