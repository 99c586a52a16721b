"""Every reference fixture in ../shared/fixtures, run through the project's own
converter and loader (tests/parity/run_fixture.py) and judged by the fixtures'
compare.py at its tolerances."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/cases.json")) if FIXTURES.is_dir() else []


def test_fixtures_present():
    if not NAMES:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the reference fixtures at {FIXTURES}")
        pytest.skip(f"no reference fixtures at {FIXTURES} (they live in the shared folder beside the repo)")


@pytest.mark.parametrize("name", NAMES)
def test_fixture(name, tmp_path):
    fixture = FIXTURES / name
    out = tmp_path / "results.npz"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "parity" / "run_fixture.py"), str(fixture), str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cmp = subprocess.run(
        [sys.executable, str(FIXTURES / "compare.py"), str(out), str(fixture / "expected.npz")],
        capture_output=True,
        text=True,
    )
    print(cmp.stdout)
    assert cmp.returncode == 0, cmp.stdout
