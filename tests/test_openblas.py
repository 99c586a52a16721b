"""The command lines run again with the system's OpenBLAS preloaded where MLX would use its
bundled reference BLAS (cli/common.prefer_openblas): once, and never against the user's wish."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_starflow.tools import machine

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device() != mx.cpu, reason="Linux on the CPU only"
)

# What a front end does first; then what the process it became sees.
SCRIPT = """
import os, sys
from mlx_starflow.cli.common import prefer_openblas
argv = prefer_openblas(sys.argv[1:])
from mlx_starflow.tools import machine
print(repr((os.environ.get("LD_PRELOAD", ""), os.environ.get("MLX_STARFLOW_OPENBLAS_REEXEC", ""),
            machine.reference_blas(), argv)))
"""


def run(args=(), **env):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_STARFLOW_NO_OPENBLAS")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], env={**base, **env}, capture_output=True, text=True, check=True
    )
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def library(tmp_path):
    """The system's OpenBLAS where there is one (then the preload must take), else a stand-in
    file (the loader ignores it, the re-execution still shows)."""
    real = machine.openblas_library()
    if real is not None:
        return real, True
    fake = tmp_path / "libopenblas.so.0"
    fake.write_bytes(b"")
    return str(fake), False


def test_the_command_runs_again_with_openblas_once(library):
    path, real = library
    preload, again, reference, argv = run(["--prompt", "a cat"], MLX_STARFLOW_OPENBLAS=path)
    assert preload == path and again == "1" and argv == ["--prompt", "a cat"]
    if real:  # MLX's products now go through OpenBLAS
        assert reference is False
    # the re-executed process does not go again (the guard), nor a process given another BLAS
    assert run(MLX_STARFLOW_OPENBLAS=path, MLX_STARFLOW_OPENBLAS_REEXEC="1")[:2] == ("", "1")
    assert run(MLX_STARFLOW_OPENBLAS=path, LD_PRELOAD="/opt/intel/libmkl_rt.so")[:2] == ("/opt/intel/libmkl_rt.so", "")


def test_the_user_can_say_no(library):
    path, _ = library
    preload, again, _, argv = run(["--no-openblas", "--seed", "3"], MLX_STARFLOW_OPENBLAS=path)
    assert (preload, again, argv) == ("", "", ["--seed", "3"])
    assert run(MLX_STARFLOW_OPENBLAS=path, MLX_STARFLOW_NO_OPENBLAS="1")[:2] == ("", "")
    # no OpenBLAS on the system: nothing happens
    assert run(MLX_STARFLOW_OPENBLAS=str(Path(path).parent / "missing.so"))[:2] == ("", "")
