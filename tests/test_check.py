"""python -m mlx_starflow.check: every path on the default device and the CPU, one table (both
sides are the CPU here, so every difference is zero)."""

import re

from mlx_starflow import check
from mlx_starflow.tools.check import cases

CASES = ["demo"] + [c.name for c in cases()]


def test_check_prints_one_table_with_every_case(capsys):
    status = check.main(["--images", "2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "- device: CPU against CPU" in out
    assert re.search(r"- chip: .+, memory [\d.]+ GB", out)
    assert re.search(r"mlx \d+\.\d+", out)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert [r.split(" | ")[0][2:] for r in rows] == CASES
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[2] == "0" and cells[3] == "0" and cells[5] == "ok", r  # the same device twice
    ips = re.search(r"- demo: ([\d.]+) images per second on CPU", out)
    assert ips and float(ips.group(1)) > 0
    peak = re.search(r"- peak memory \(MLX, the largest case\): (\d+) MB", out)
    assert peak and int(peak.group(1)) > 0
    assert "every case agrees" in out
    for name in ("sequential", "Jacobi", "T5", "Gemma", "SD-VAE", "score", "invert"):
        assert name in out


def test_check_refuses_no_images(capsys):
    assert check.main(["--images", "0"]) == 1
    assert "--images" in capsys.readouterr().err
