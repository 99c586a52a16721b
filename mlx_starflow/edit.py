"""`python -m mlx_starflow.edit` and the names `mlx_starflow.edit` always had: a shim. The
library is editing.py, the command line cli/edit.py."""

from .cli.edit import main
from .editing import *  # noqa: F401,F403
from .editing import __all__ as _api

__all__ = [*_api, "main"]

if __name__ == "__main__":
    raise SystemExit(main())
