import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Command lines re-run themselves with the system's OpenBLAS when MLX has only its reference
# BLAS (cli/common.prefer_openblas); the tests compare command lines bit for bit with runs in
# this process, which keeps the bundled BLAS, so their subprocesses stay on it too.
# tests/test_openblas.py clears this to test the re-run itself.
os.environ["MLX_STARFLOW_NO_OPENBLAS"] = "1"


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
