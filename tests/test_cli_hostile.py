"""The command lines against hostile or mistaken input: outputs that are folders or of the
wrong kind, existing sidecars, metadata that names places, a full disk, very large counts.
Every mistake is one `error:` line and status 1, with nothing written."""

import errno
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mlx_starflow import images, options
from mlx_starflow.cli.generate import main
from mlx_starflow.pipeline import Pipeline


def run(capsys, *args):
    code = main(["--model", "demo", "--prompt", "red circle", "--no-progress", *args])
    return code, capsys.readouterr().err


def test_an_output_of_another_format_or_a_folder_is_refused(tmp_path, capsys):
    code, err = run(capsys, "--output", str(tmp_path / "x.jpg"))
    assert code == 1 and err.startswith("error: --output") and "PNG" in err and ".jpg" in err
    (tmp_path / "dir.png").mkdir()
    code, err = run(capsys, "--output", str(tmp_path / "dir.png"))
    assert code == 1 and "is a folder" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]


def test_an_existing_sidecar_needs_overwrite(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{}")
    code, err = run(capsys, "--seed", "1", "--metadata", "--output", str(tmp_path / "a.png"))
    assert code == 1 and "a.json already exists" in err
    assert (tmp_path / "a.json").read_text() == "{}" and not (tmp_path / "a.png").exists()
    code, err = run(capsys, "--seed", "1", "--metadata", "--overwrite", "--output", str(tmp_path / "a.png"))
    assert code == 0 and json.loads((tmp_path / "a.json").read_text())["seed"] == 1


def test_metadata_replays_settings_never_places(tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("do not echo me\n")
    params = {
        "prompt": "blue square",
        "seed": 3,
        "guidance": 1.0,
        "output": str(elsewhere / "x-{seed}.png"),
        "prompt_file": str(secret),
        "checkpoint": str(tmp_path / "evil.pth"),
        "config": str(tmp_path / "evil.yaml"),
        "vae": str(tmp_path / "evil-vae"),
        "text_encoder": str(tmp_path / "evil-t5"),
        "model": "demo",
    }
    info = PngInfo()
    info.add_text("parameters", json.dumps(params))
    crafted = tmp_path / "crafted.png"
    Image.new("RGB", (32, 32)).save(crafted, pnginfo=info)
    monkeypatch.chdir(tmp_path)
    code = main(["--from-image", str(crafted), "--model", "demo", "--no-progress", "--output", "again.png"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert list(elsewhere.iterdir()) == [] and "do not echo me" not in err
    meta = images.read_metadata(tmp_path / "again.png")
    assert meta["prompt"] == "blue square" and meta["seed"] == 3
    assert "checkpoint" not in meta and "vae" not in meta and "text_encoder" not in meta


def test_a_full_disk_leaves_no_partial_set(tmp_path, capsys, monkeypatch):
    real, calls = images._temporary, []

    def fail_third(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(images, "_temporary", fail_third)
    code, err = run(capsys, "--num-images", "4", "--seed", "1", "--output", str(tmp_path / "x-{index}.png"))
    assert code == 1 and "No space left on device" in err and "none of the 4 files was written" in err
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in err


def test_large_counts_run_in_batches_with_the_images_of_one_call(tmp_path, capsys, monkeypatch):
    pipe = Pipeline.from_pretrained("demo")
    whole = pipe.generate(["red circle", "blue square"], num_images=3, seed=5, sampler="sequential")
    opts = options.GenerateOptions(["red circle", "blue square"], num_images=3, sampler="sequential")
    parts = options.batches(opts, whole.seeds, 4)
    assert [p.indices for p in parts] == [[0, 1, 2, 3], [4, 5]]
    latents = np.concatenate([np.array(pipe.generate(p.options).latents) for p in parts])
    np.testing.assert_array_equal(latents, np.array(whole.latents))
    with pytest.raises(ValueError, match="at most 64"):
        pipe.generate("red circle", num_images=65)

    # the command line: batch after batch; a failure in a later batch removes the earlier files
    monkeypatch.setattr(options, "MAX_BATCH", 2)
    code, err = run(capsys, "--num-images", "5", "--seed", "1", "--output", str(tmp_path / "b-{index}.png"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"b-{i}.png" for i in range(5)]
    first = images.read_metadata(tmp_path / "b-4.png")
    assert first["seed"] == 5

    real, calls = images._temporary, []

    def fail_later(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(images, "_temporary", fail_later)
    out = tmp_path / "c"
    out.mkdir()
    code, err = run(capsys, "--num-images", "4", "--seed", "1", "--output", str(out / "c-{index}.png"))
    assert code == 1 and "removed the 2 files" in err and list(out.iterdir()) == []
    calls.clear()
    code, err = run(
        capsys, "--num-images", "4", "--seed", "1", "--keep-partial", "--output", str(out / "k-{index}.png")
    )
    assert code == 1 and "kept the 2 images" in err
    assert sorted(p.name for p in out.iterdir()) == ["k-0.png", "k-1.png"]
