"""`python -m mlx_starflow.score` and the names `mlx_starflow.score` always had: a shim. The
library is likelihood.py, the command line cli/score.py."""

from .cli.score import main
from .likelihood import *  # noqa: F401,F403
from .likelihood import __all__ as _api

__all__ = [*_api, "main"]

if __name__ == "__main__":
    raise SystemExit(main())
