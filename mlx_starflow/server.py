"""`python -m mlx_starflow.server`: a shim kept for the entry point; the command lives in cli/server.py."""

from .cli.server import *  # noqa: F401,F403
from .cli.server import main

if __name__ == "__main__":
    raise SystemExit(main())
