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
from mlx_starflow.cli.generate import main
from mlx_starflow.images import read_metadata
from mlx_starflow.loading.hub import DEMO

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


def test_help_describes_every_option_and_its_default(capsys):
    p = generate.parser()
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no description"
        if action.dest in ("prompts", "prompt_file", "from_image", "model"):
            continue  # what to draw, not a setting: nothing to default to
        switch = action.nargs == 0  # --overwrite, --metadata, ...: off unless given
        shown = action.default not in (None, False, "")  # the formatter prints "(default: ...)"
        assert switch or shown or "default" in action.help, f"{action.option_strings[0]} hides its default"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in [
        "(default: apple/starflow)",
        "(default: 16)",
        "(default: 0.001)",
        "(default: 32)",
        "(default: auto)",
        "(default: starflow-{seed}.png)",
        "--sampler {jacobi,sequential}",
        "(default: the model's own, else jacobi)",
        "(default: the model's own, else 3.6",
        "(default: the model's size, 256 for the release)",
    ]:
        assert expected in text, expected
    # What the help says about the demo's own defaults is what its folder holds.
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["sampling"]["guidance"] == 1.0 and cfg["sampling"]["sampler"] == "sequential"
    assert cfg["image_size"] == 32
    assert "the demo samples with guidance 1.0, sequentially, at 32x32" in text.lower()


@pytest.mark.parametrize(
    "flag,value,rule",
    [
        ("--cfg", "-1", "guidance must be >= 0"),
        ("--cfg", "nan", "guidance must be >= 0 and finite"),
        ("--cfg", "inf", "guidance must be >= 0 and finite"),
        ("--cfg", "1e9", "from 0.0 to 100.0"),
        ("--jacobi-threshold", "-0.5", "threshold must be a finite number from 0.0 to 1.0"),
        ("--jacobi-threshold", "nan", "threshold must be a finite number from 0.0 to 1.0"),
        ("--jacobi-block-size", "0", "from 1 to 4096"),
        ("--jacobi-max-iter", "0", "from 1 to 1000"),
        ("--jacobi-max-iter", "1000000000000000", "from 1 to 1000"),
        ("--num-images", "0", "from 1 to 1000"),
        ("--height", "-32", "from 1 to 4096"),
        ("--vae-tile", "1", "from 2 to 4096"),
        ("--seed", "-1", "seed must be a whole number from 0 to"),
        ("--seed", str(2**64), "seed must be a whole number from 0 to"),
    ],
)
def test_errors_name_the_flag_before_any_loading(tmp_path, capsys, flag, value, rule):
    # The model does not exist: the flag is checked before anything is loaded.
    code = main(
        ["--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", str(tmp_path / "x.png"), flag, value]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {flag}: ") and rule in err, err
    assert "no-model" not in err and not (tmp_path / "x.png").exists()


def test_a_missing_path_is_reported_as_a_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ["./nope", str(tmp_path / "nope"), "models/a/b"]:
        assert main(["--model", model, "--prompt", "x"]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {model}: no such file or folder\n", err


def test_from_image_makes_the_same_image_and_given_flags_override(tmp_path, capsys):
    first = tmp_path / "starflow-42.png"
    # settings away from the demo's defaults, so they can only come back from the metadata
    assert (
        demo(
            "--seed",
            "42",
            "--cfg",
            "2",
            "--sampler",
            "jacobi",
            "--jacobi-block-size",
            "8",
            "--denoise",
            "none",
            "--output",
            str(first),
        )
        == 0
    )
    again = tmp_path / "again.png"
    assert main(["--from-image", str(first), "--model", "demo", "--output", str(again)]) == 0
    assert again.read_bytes() == first.read_bytes()  # same pixels and the same parameters
    meta = read_metadata(again)
    assert (meta["guidance"], meta["sampler"], meta["jacobi_block_size"], meta["denoise"]) == (2.0, "jacobi", 8, "none")

    # a flag given explicitly wins over the PNG's value; the rest still comes from the PNG
    other = tmp_path / "other.png"
    assert (
        main(["--from-image", str(first), "--model", "demo", "--seed", "7", "--cfg", "1.5", "--output", str(other)])
        == 0
    )
    meta = read_metadata(other)
    assert (meta["seed"], meta["guidance"], meta["sampler"], meta["jacobi_block_size"]) == (7, 1.5, "jacobi", 8)
    direct = tmp_path / "direct.png"
    assert (
        demo(
            "--seed",
            "7",
            "--cfg",
            "1.5",
            "--sampler",
            "jacobi",
            "--jacobi-block-size",
            "8",
            "--denoise",
            "none",
            "--output",
            str(direct),
        )
        == 0
    )
    assert np.array_equal(pixels(other), pixels(direct))
    assert not np.array_equal(pixels(other), pixels(first))

    # the default output name would replace the original: refused, as for any existing file
    assert main(["--from-image", str(first), "--model", "demo", "--output", str(first)]) == 1
    assert "already exists" in capsys.readouterr().err
    # what is loaded comes from the command line alone: the image names it, the user gives it
    assert main(["--from-image", str(first), "--output", str(tmp_path / "x.png")]) == 1
    assert "made with --model demo; give --model" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_from_image_errors(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    (tmp_path / "notes.txt").write_text("hello")
    for name, says in [
        ("missing.png", "no such file"),
        ("plain.png", "no prompt and seed"),
        ("notes.txt", "not a PNG with generation parameters"),
    ]:
        assert main(["--from-image", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: --from-image {tmp_path / name}: ") and says in err, err
    with pytest.raises(SystemExit):
        main(["--model", "demo"])  # neither --prompt nor --from-image
    err = capsys.readouterr().err
    assert "arguments are required: --prompt" in err and "--from-image" in err


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


def run_example(name, *args, cwd):
    env = dict(os.environ)  # HF_HUB_OFFLINE, an empty HF_HOME and cache from the fixture
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_examples_with_no_arguments(tmp_path):
    # first_image.py defaults to the 3B release: not here, so a message saying how to get it
    r = run_example("first_image.py", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: model 'apple/starflow' is not in the local Hugging Face cache")
    assert "download apple/starflow" in r.stderr and "--model demo" in r.stderr
    # app.py defaults to the demo: it runs
    r = run_example("app.py", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cancelled; the pipeline is still ready" in r.stdout and (tmp_path / "app_image.png").is_file()
    r = run_example("app.py", "--model", "nobody/no-such-model", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nobody/no-such-model" in r.stderr, r.stderr
    # a prompt the demo cannot draw: one error line, exit 1, no image
    (tmp_path / "app_image.png").unlink()
    r = run_example("app.py", "--prompt", "pink circle", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("error:") == 1 and "pink circle" in r.stderr, r.stderr
    assert not (tmp_path / "app_image.png").exists()


def test_first_image_example_with_the_demo(tmp_path):
    r = run_example("first_image.py", "--model", "demo", "--prompt", "red circle", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "first_image.png").size == (32, 32)
