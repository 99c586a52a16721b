import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import rand, save_reference, tiny_flow
from tiny_release import T5_WIDTH, make_release

from mlx_starflow.cli.convert import starflow_main
from mlx_starflow.loading.resolve import resolve
from mlx_starflow.loading.torch_reader import CheckpointError, load_pth
from mlx_starflow.loading.weights import WeightsError, convert_starflow, convert_tarflow, load_flow, read_config
from mlx_starflow.models.config import ConfigError
from mlx_starflow.sample import sample

ROOT = Path(__file__).resolve().parents[1]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name not in ("model.pth", "config.yaml", "src"))


@pytest.fixture
def reference(tmp_path):
    model, args = tiny_flow()
    src = tmp_path / "src"
    src.mkdir()
    ckpt, cfg = save_reference(model, args, src)
    return model, ckpt, cfg


def test_convert_and_load_reproduces_the_model(reference, tmp_path):
    model, ckpt, cfg = reference
    out = convert_starflow(ckpt, cfg, tmp_path / "mlx")
    meta = json.loads((out / "config.json").read_text())
    # every architectural number is explicit
    for key in (
        "channels",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "layers_per_block",
        "seq_order",
        "txt_size",
        "txt_dim",
        "in_channels",
        "input_size",
        "patch_size",
        "noise_std",
        "vae",
        "text_encoder",
        "sos",
        "use_softplus",
        "soft_clip",
    ):
        assert key in meta
    assert meta["txt_dim"] == 12 and meta["input_size"] == 4 and meta["layers_per_block"] == [1, 0, 1, 2]
    assert (out / "LICENSE_MODEL").is_file()
    loaded = load_flow(out)
    x = rand((2, 4, 4, 4))
    y = rand((2, 5, 12), 2)
    for a, b in zip(model(x, y), loaded(x, y)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6)


def test_bfloat16_and_quantized_conversion(reference, tmp_path):
    model, ckpt, cfg = reference
    out = convert_starflow(ckpt, cfg, tmp_path / "bf16", dtype="bfloat16")
    loaded = load_flow(out)
    assert loaded.blocks[-1].proj_in.weight.dtype == mx.bfloat16
    x, y = rand((1, 4, 4, 4)), rand((1, 5, 12), 2)
    z32, _ = model(x, y)
    z16, _ = loaded(x, y)

    def rel(a):
        return np.abs(np.array(a) - np.array(z32)).max() / np.abs(np.array(z32)).max()

    assert rel(z16) < 0.05  # bfloat16 rounding through four random blocks
    # group size 32 fits the 32-wide layers of the tiny model
    q = convert_starflow(ckpt, cfg, tmp_path / "q8", quantize={"bits": 8, "group_size": 32})
    assert json.loads((q / "config.json").read_text())["quantization"] == {"bits": 8, "group_size": 32}
    qm = load_flow(q)
    assert "scales" in qm.blocks[-1].attn_blocks[0].attention.qkv
    assert isinstance(qm.blocks[-1].attn_blocks[0].attention.qkv, nn.QuantizedLinear)
    assert "scales" not in qm.blocks[-1].proj_out  # only the transformer's linears
    zq, _ = qm(x, y)
    assert rel(zq) < 0.05


def test_tensor_reader_matches_torch_and_refuses_code(tmp_path):
    sd = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, 6)[:, ::2],
        "h": torch.randn(2).half(),
        "bf": torch.randn(4, 2).bfloat16(),
        "s": torch.tensor(3.0),
        "i": torch.arange(4),
    }
    torch.save(sd, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")
    for k, v in sd.items():
        g = np.array(got[k].astype(mx.float32)) if isinstance(got[k], mx.array) else got[k]
        np.testing.assert_array_equal(g, v.float().numpy() if v.is_floating_point() else v.numpy())
        assert g.shape == tuple(v.shape)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"refusing to load '(__builtin__|builtins)\.print'"):
        load_pth(tmp_path / "evil.pth")


def test_truncated_and_foreign_files(reference, tmp_path):
    _, ckpt, cfg = reference
    data = ckpt.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_starflow(bad, cfg, tmp_path / "out")
    txt = tmp_path / "notes.pth"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        convert_starflow(txt, cfg, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        convert_starflow(tmp_path / "missing.pth", cfg, tmp_path / "out")
    assert leftovers(tmp_path) == ["notes.pth", "truncated.pth"]


def _resave(ckpt, edit):
    sd = torch.load(ckpt, weights_only=True)
    edit(sd)
    torch.save(sd, ckpt)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("blocks.3.proj_out.bias"), "missing 1 tensors .*blocks.3.proj_out.bias"),
        (lambda sd: sd.__setitem__("blocks.3.extra.weight", torch.zeros(2)), "does not use: blocks.3.extra.weight"),
        (
            lambda sd: sd.__setitem__("blocks.0.proj_in.weight", torch.zeros(32, 5)),
            r"wrong shape: blocks.0.proj_in.weight \(32, 5\) \(expected \(32, 4\)\)",
        ),
    ],
)
def test_key_mismatches_are_named(reference, tmp_path, edit, match):
    _, ckpt, cfg = reference
    _resave(ckpt, edit)
    with pytest.raises(WeightsError, match=match):
        convert_starflow(ckpt, cfg, tmp_path / "out")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "line,match",
    [
        ("- wobble: 3\n", "unknown config option 'wobble'"),
        ("- temporal_causal: 1\n", "'temporal_causal: 1' is not supported"),
        ("- shallow_block_local: 1\n", "'shallow_block_local: 1' is not supported"),
        ("- vid_size: '81:16'\n", "'vid_size: 81:16' is not supported"),
    ],
)
def test_config_options(reference, tmp_path, line, match):
    _, ckpt, cfg = reference
    cfg.write_text(cfg.read_text() + line)
    with pytest.raises(ConfigError, match=match):
        convert_starflow(ckpt, cfg, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_training_options_ignored_and_unsupported_at_default_accepted(reference, tmp_path):
    _, ckpt, cfg = reference
    cfg.write_text(cfg.read_text() + "- fsdp: 1\n- adaln: 0\n- grad_clip: 1\n- wds: 1\n")
    assert convert_starflow(ckpt, cfg, tmp_path / "out").is_dir()


def test_options_the_reference_model_ignores_are_accepted(reference, tmp_path):
    # The reference's setup_transformer never passes adaln or nvp to its Model, and the
    # Model swallows noise_embed_denoiser: the checkpoint is the same whatever they say.
    _, ckpt, cfg = reference
    cfg.write_text(cfg.read_text() + "- adaln: 1\n- nvp: 0\n- noise_embed_denoiser: 1\n")
    assert convert_starflow(ckpt, cfg, tmp_path / "out").is_dir()


def test_existing_output_needs_force(reference, tmp_path):
    _, ckpt, cfg = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        convert_starflow(ckpt, cfg, out)
    assert (out / "keep").exists()
    convert_starflow(ckpt, cfg, out, force=True)
    assert not (out / "keep").exists() and (out / "model.safetensors").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a converted model folder"):
        load_flow(tmp_path)


def test_tarflow_converter_infers_architecture(tmp_path):
    from mlx.utils import tree_flatten
    from test_flow import tiny_tarflow

    model = tiny_tarflow()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
    sd["var"] = torch.ones(16, 12)
    for i in range(3):
        sd[f"blocks.{i}.attn_mask"] = torch.ones(16, 16)
    ckpt = tmp_path / "tiny_model_2_16_3_1_0.05.pth"
    torch.save(sd, ckpt)
    out = convert_tarflow(ckpt, tmp_path / "mlx", head_dim=8)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "tarflow" and cfg["patch_size"] == 2 and cfg["input_size"] == 8
    assert cfg["layers_per_block"] == [1, 2, 1] and cfg["num_classes"] == 3 and cfg["noise_std"] == 0.05
    loaded = load_flow(out)
    x, labels = rand((2, 8, 8, 3)), mx.array([1, 2])
    np.testing.assert_allclose(np.array(loaded(x, labels)[0]), np.array(model(x, labels)[0]), atol=1e-6)
    plain = tmp_path / "weights.pth"
    plain.write_bytes(ckpt.read_bytes())
    with pytest.raises(ValueError, match="--noise-std"):
        convert_tarflow(plain, tmp_path / "mlx2", head_dim=8)
    with pytest.raises(ConfigError, match="not a multiple of the head size 64"):
        convert_tarflow(ckpt, tmp_path / "mlx3")


def test_command_line_reports_one_line(reference, tmp_path):
    _, ckpt, cfg = reference
    cmd = [sys.executable, str(ROOT / "convert" / "starflow.py"), "--checkpoint", str(ckpt), "--config", str(cfg)]
    ok = subprocess.run(cmd + ["--out", str(tmp_path / "o"), "--dtype", "bfloat16"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    again = subprocess.run(cmd + ["--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_latent_grid_from_the_vae(tmp_path, monkeypatch):
    # A release whose VAE has two levels: its 16x16 images are 8x8 latents (the reference's
    # 2 ** (len(down_block_types) - 1)), not the 2x2 an assumed factor of 8 would give.
    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "release"
    root.mkdir()
    model, args = make_release(root, text_encoder=False)
    where = resolve(str(root))  # converts once, with the release's vae/ config
    meta = json.loads((where.flow / "config.json").read_text())
    assert (meta["input_size"], meta["pt_seq_len"], meta["vae_downsample"]) == (8, 8, 2)
    flow = load_flow(where.flow)
    assert flow.config.pixels_per_latent == 2
    x, y = rand((2, 8, 8, 4)), rand((2, 6, T5_WIDTH), 2)
    z, logdet = flow(x, y)
    want_z, want_logdet = model(x, y)
    np.testing.assert_allclose(np.array(z), np.array(want_z), atol=1e-5)
    np.testing.assert_allclose(np.array(logdet), np.array(want_logdet), rtol=1e-5, atol=1e-5)
    # sampling walks the same 8x8 grid back: noise z -> x
    np.testing.assert_allclose(np.array(sample(flow, z, y)), np.array(x), atol=1e-3)

    # An explicit local VAE folder wins over the release's vae/, and is part of the cache key.
    from test_vae import make_reference

    make_reference(tmp_path / "vae3", block_out_channels=(8, 8, 8), norm_num_groups=4)
    other = resolve(str(root), vae=str(tmp_path / "vae3"))
    assert other.flow != where.flow and read_config(other.flow).input_size == 4
    assert read_config(other.flow).vae_downsample == 4 and other.vae == str(tmp_path / "vae3")

    # The converter on its own: --vae FOLDER; without it the config's VAE must be known by name.
    ckpt, cfg = root / "tiny_t2i.pth", root / "tiny_t2i.yaml"
    assert (
        starflow_main(
            [
                "--checkpoint",
                str(ckpt),
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "cli"),
                "--vae",
                str(root / "vae"),
            ]
        )
        == 0
    )
    assert read_config(tmp_path / "cli").input_size == 8
    sd_vae = read_config(convert_starflow(ckpt, cfg, tmp_path / "by_name"))  # stabilityai/sd-vae-ft-ema
    assert (sd_vae.input_size, sd_vae.vae_downsample) == (2, 8)
    cfg.write_text(cfg.read_text().replace("stabilityai/sd-vae-ft-ema", "someone/two-level-vae"))
    with pytest.raises(ConfigError, match="not known by name.*--vae FOLDER"):
        convert_starflow(ckpt, cfg, tmp_path / "unknown")
    assert not (tmp_path / "unknown").exists()
    assert read_config(convert_starflow(ckpt, cfg, tmp_path / "known", vae=root / "vae")).input_size == 8
    with pytest.raises(ValueError, match="no such VAE folder"):
        convert_starflow(ckpt, cfg, tmp_path / "bad", vae=tmp_path / "missing")

    # Folders converted before the field existed read as the SD-VAE's 8.
    old = json.loads((tmp_path / "by_name" / "config.json").read_text())
    del old["vae_downsample"]
    (tmp_path / "by_name" / "config.json").write_text(json.dumps(old))
    assert read_config(tmp_path / "by_name").pixels_per_latent == 8


def test_cache_converts_again_for_a_new_converter(reference, tmp_path, monkeypatch):
    from mlx_starflow.loading import weights

    monkeypatch.setenv("MLX_STARFLOW_CACHE", str(tmp_path / "cache"))
    _, ckpt, _ = reference
    first = resolve(str(ckpt)).flow
    meta = json.loads((first / "config.json").read_text())
    assert meta["conversion_version"] == weights.CONVERSION_VERSION
    assert resolve(str(ckpt)).flow == first
    # A folder an older converter wrote under this key (or one with no version) is replaced.
    for old in (1, None):
        if old is None:
            meta.pop("conversion_version")
        else:
            meta["conversion_version"] = old
        (first / "config.json").write_text(json.dumps(meta))
        assert resolve(str(ckpt)).flow == first
        assert json.loads((first / "config.json").read_text())["conversion_version"] == weights.CONVERSION_VERSION
    # A new converter version is a new cache key.
    monkeypatch.setattr(weights, "CONVERSION_VERSION", weights.CONVERSION_VERSION + 1)
    newer = resolve(str(ckpt)).flow
    assert newer != first and weights.conversion_version(newer) == weights.CONVERSION_VERSION


def test_quantizing_a_quantized_folder(reference, tmp_path):
    _, ckpt, cfg = reference
    q = convert_starflow(ckpt, cfg, tmp_path / "q8", quantize={"bits": 8, "group_size": 32})
    same = load_flow(q, quantize={"bits": 8, "group_size": 32})  # what it is already: fine
    assert same.config.quantization == {"bits": 8, "group_size": 32}
    for other in ({"bits": 4, "group_size": 32}, {"bits": 8, "group_size": 64}):
        with pytest.raises(ValueError, match=r"already quantized to 8 bits \(group size 32\).*unquantized folder"):
            load_flow(q, quantize=other)
    # The converter asks the same validator (quant.quant_args) as the loaders, before any work
    with pytest.raises(ValueError, match="4 or 8 bits"):
        convert_starflow(ckpt, cfg, tmp_path / "q3", quantize={"bits": 3, "group_size": 32})
    assert not (tmp_path / "q3").exists()
