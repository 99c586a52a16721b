"""`python -m mlx_starflow.generate`: a shim kept for the entry point; the command lives in cli/generate.py."""

from .cli.generate import *  # noqa: F401,F403
from .cli.generate import main
from .images import read_metadata  # noqa: F401 (the README's mlx_starflow.generate.read_metadata)

if __name__ == "__main__":
    raise SystemExit(main())
