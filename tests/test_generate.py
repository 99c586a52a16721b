"""The generate command as a user meets it: its help, its errors naming the flag,
--from-image, the files it writes and its progress bars; and the examples run with
no arguments. The bundled demo model keeps every run to about a second; nothing is
downloaded (HF_HUB_OFFLINE with an empty HF_HOME)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_starflow import generate
from mlx_starflow.generate import main, read_metadata
from mlx_starflow.hub import DEMO

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))


def demo(*args):
    return main(["--model", "demo", "--prompt", "red circle", *args])


def pixels(path):
    return np.array(Image.open(path))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        assert demo("--seed", "1", "--metadata", "--output", str(tmp_path / "a.png")) == 0
    finally:
        os.umask(old)
    for name in ["a.png", "a.json"]:
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    # stderr captured (a pipe or a log): no bar at all
    assert demo("--seed", "1", "--output", str(tmp_path / "a.png")) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip() == str(tmp_path / "a.png")
    # the same bars are drawn when stderr is a terminal
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bars = generate.Bars(True)
    bars("deep", 3, 64)
    bars.close()
    assert "Deep block" in term.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    bars = generate.Bars(False)  # --no-progress
    bars("deep", 3, 64)
    bars.close()
    assert quiet.getvalue() == ""


