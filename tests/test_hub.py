"""Naming models: paths against repo ids, and the advice when the release is not
downloaded: commands for the installed huggingface-hub that fetch exactly the files
the engine reads. Nothing is downloaded: HF_HUB_OFFLINE with an empty HF_HOME."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

from mlx_starflow.loading import hub, text, vae
from mlx_starflow.loading import resolve as resolver
from mlx_starflow.loading.hub import ModelNotFound, download_command, is_repo_id, looks_like_path, patterns
from mlx_starflow.loading.resolve import resolve


def offline_env(tmp_path):
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MLX_STARFLOW_CACHE=str(tmp_path / "cache")
    )


def not_found(tmp_path, model) -> str:
    """The ModelNotFound message for `model`, in a fresh process (huggingface-hub reads
    HF_HOME and HF_HUB_OFFLINE when imported)."""
    code = (
        "import sys\nfrom mlx_starflow.loading.resolve import resolve, ModelNotFound\n"
        f"try:\n    resolve({model!r})\nexcept ModelNotFound as e:\n    print(e)\nelse:\n    sys.exit('found')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(tmp_path), timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_paths_and_repo_ids():
    for name in ["./nope", "../models/x", "/abs/model", "~/models/x", "models/a/b"]:
        assert looks_like_path(name) and not is_repo_id(name), name
    for name in ["apple/starflow", "google/flan-t5-xl", "stabilityai/sd-vae-ft-ema"]:
        assert is_repo_id(name) and not looks_like_path(name), name


def test_a_missing_path_is_not_advice_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ["./nope", "~/nope", str(tmp_path / "nope"), "models/a/b"]:
        with pytest.raises(ModelNotFound) as e:
            resolve(name)
        assert str(e.value) == f"{name}: no such file or folder"
    with pytest.raises(ModelNotFound, match="no such checkpoint"):
        resolve("./nope.pth")
    # the text encoder and the VAE named by a missing path: a missing folder, not a repo to fetch
    with pytest.raises(FileNotFoundError, match="no such folder"):
        text._resolve("./no-encoder")
    with pytest.raises(ValueError, match="no such VAE folder"):
        vae._resolve("./no-vae")


def test_the_release_message_gives_the_commands_and_the_size(tmp_path):
    msg = not_found(tmp_path, "apple/starflow")
    assert msg.startswith("model 'apple/starflow' is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in msg and "about 27 GB" in msg
    assert int(huggingface_hub.__version__.split(".")[0]) >= 1  # the venv's; the 0.x form is tested below
    expected = [
        "hf download apple/starflow --include starflow_3B_t2i_256x256.pth --include 'LICENSE*'",
        "hf download google/flan-t5-xl --include '*.json' --include '*.safetensors' --include '*.model' "
        "--include 'tokenizer*'",
        "hf download stabilityai/sd-vae-ft-ema --include config.json --include diffusion_pytorch_model.safetensors "
        "--include vae/config.json --include vae/diffusion_pytorch_model.safetensors",
    ]
    lines = [line.strip() for line in msg.splitlines()]
    for command, size in zip(expected, ["15.4", "11.4", "0.33"]):
        assert f"{command}    (~{size} GB)" in lines, msg
    assert "huggingface-cli" not in msg and "--model demo" in msg
    # another checkpoint of the release repo: the command names that file
    code = (
        "from mlx_starflow.loading.hub import download_advice, patterns\n"
        "print(download_advice('apple/starflow', patterns('model', 'other.pth')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "hf download apple/starflow --include other.pth --include 'LICENSE*'" in out


def test_another_repo_gets_its_own_command(tmp_path):
    msg = not_found(tmp_path, "nobody/no-such-model")
    assert "hf download nobody/no-such-model --include starflow_3B_t2i_256x256.pth --include 'LICENSE*'" in msg
    assert "google/flan-t5-xl" not in msg


def test_commands_for_huggingface_hub_before_1(monkeypatch):
    # huggingface-cli's --include takes several patterns after one flag
    monkeypatch.setattr(huggingface_hub, "__version__", "0.35.3")
    assert download_command("google/flan-t5-xl", patterns("text encoder")) == (
        "huggingface-cli download google/flan-t5-xl --include '*.json' '*.safetensors' '*.model' 'tokenizer*'"
    )


def _cached_repo(home: Path, repo: str, files, rev="0123456789abcdef0123456789abcdef01234567") -> Path:
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for name in files:
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text("x")
    return snap


def test_the_installed_cli_accepts_the_commands(tmp_path):
    # Run the advised commands with the installed huggingface-hub CLI against a cache that
    # already holds the files (offline, nothing to fetch): the flags parse and the files
    # are found where the engine looks for them.
    home = tmp_path / "hf"
    snaps = {
        "apple/starflow": _cached_repo(home, "apple/starflow", ["starflow_3B_t2i_256x256.pth", "LICENSE_MODEL"]),
        "google/flan-t5-xl": _cached_repo(home, "google/flan-t5-xl", ["config.json", "spiece.model"]),
        "stabilityai/sd-vae-ft-ema": _cached_repo(home, "stabilityai/sd-vae-ft-ema", ["config.json"]),
    }
    bindir = Path(sys.executable).parent
    for role, repo, _ in hub.RELEASE:
        argv = shlex.split(download_command(repo, patterns(role)))
        exe = bindir / argv[0]
        assert exe.is_file(), f"{argv[0]} is not installed beside {sys.executable}"
        run = subprocess.run(
            [str(exe), *argv[1:]], capture_output=True, text=True, env=offline_env(tmp_path), timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert str(snaps[repo]) in run.stdout


def test_one_table_of_files(tmp_path, monkeypatch):
    """The text encoder, the VAE and the model are fetched with the table's patterns,
    the same the advice prints."""
    asked = {}

    def fake_download(repo_id, files, what):
        asked[what] = list(files) if files is not None else patterns(what)
        folder = tmp_path / what
        folder.mkdir(exist_ok=True)
        for name in ("model.safetensors", "diffusion_pytorch_model.safetensors"):
            (folder / name).write_text("")
        if what == "model":
            raise ModelNotFound("stop here")
        return folder

    monkeypatch.setattr(text, "download", fake_download)
    monkeypatch.setattr(vae, "download", fake_download)
    monkeypatch.setattr(resolver, "download", fake_download)
    text._download("google/flan-t5-xl")
    vae._download("stabilityai/sd-vae-ft-ema")
    with pytest.raises(ModelNotFound, match="stop here"):
        resolve("apple/starflow")
    assert asked == {role: patterns(role) for role in ("text encoder", "VAE", "model")}
