import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private convert-once cache (MLX_STARFLOW_CACHE) for one test module."""
    old = os.environ.get("MLX_STARFLOW_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["MLX_STARFLOW_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MLX_STARFLOW_CACHE")
    else:
        os.environ["MLX_STARFLOW_CACHE"] = old
