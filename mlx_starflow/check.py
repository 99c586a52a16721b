"""`python -m mlx_starflow.check`: a shim for the entry point; the command lives in cli/check.py."""

from .cli.check import main

if __name__ == "__main__":
    raise SystemExit(main())
