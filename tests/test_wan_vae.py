"""The Wan2.2 video VAE: parity on the reference fixture (wan_vae_tiny), and without
fixtures: step sizes, shapes, decoding block by block and in strips, config and input
errors, strict loading."""

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_starflow.loading import device
from mlx_starflow.loading.wan_vae import load_wan_vae, save_wan_vae
from mlx_starflow.models.wan_vae import Decoder, WanVAE, WanVAEConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "wan_vae_tiny"

# 8x spatial (patches of 2, two 2x stages), 4x temporal, a shortcut conv at each width change.
TINY = {
    "dim": 4,
    "dec_dim": 4,
    "z_dim": 3,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [True, True],
    "mean": [0.1, -0.2, 0.3],
    "std": [0.5, 1.5, 0.9],
}


def tiny_vae(seed=0):
    vae = WanVAE(WanVAEConfig.from_dict(TINY))
    mx.random.seed(seed)
    # Random everything (the attention's output projection included), so every layer works.
    vae.update(tree_map(lambda p: 0.4 * mx.random.normal(p.shape) + (p if p.ndim == 1 else 0), vae.parameters()))
    mx.eval(vae.parameters())
    return vae


def video(frames, h=16, w=24, batch=1, seed=1):
    return mx.random.uniform(-1, 1, (batch, frames, h, w, 3), key=mx.random.key(seed))


@pytest.mark.parametrize("frames", [1, 9])
def test_shapes(frames):
    vae = tiny_vae()
    z = vae.encode(video(frames, batch=2))
    k = (frames - 1) // 4
    assert z.shape == (2, 1 + k, 2, 3, 3)
    assert vae.decode(z).shape == (2, frames, 16, 24, 3)


def test_step_sizes_agree():
    # One latent frame per step (bounded memory) equals the whole clip after the first frame at once.
    vae = tiny_vae()
    x = video(13)
    z4 = vae.encode(x)
    z12 = vae.encode(x, frames_per_step=12)
    assert np.allclose(np.array(z4), np.array(z12), atol=1e-5)
    one = vae.decode(z4)
    assert np.allclose(np.array(one), np.array(vae.decode(z4, frames_per_step=2)), atol=1e-5)
    assert np.allclose(np.array(one), np.array(vae.decode(z4, frames_per_step=z4.shape[1])), atol=1e-5)
    steps = [s.shape[1] for s in vae.decode_steps(z4)]
    assert steps == [1, 4, 4, 4]


def test_causal():
    # Later frames never change the latents or pixels of earlier ones.
    vae = tiny_vae()
    x = video(9)
    z = vae.encode(x)
    assert np.allclose(np.array(vae.encode(x[:, :5])), np.array(z[:, :2]), atol=1e-5)
    assert np.allclose(np.array(vae.decode(z[:, :2])), np.array(vae.decode(z)[:, :5]), atol=1e-5)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"dim": 0}, "dim"),
        ({"dec_dim": "8"}, "dec_dim"),
        ({"z_dim": True}, "z_dim"),
        ({"patch_size": 1}, "patch_size"),
        ({"dim_mult": [1, 2.5, 2]}, "dim_mult"),
        ({"dim_mult": [1]}, "dim_mult"),
        ({"temperal_downsample": [True]}, "temperal_downsample"),
        ({"temperal_downsample": [1, 0]}, "temperal_downsample"),
        ({"mean": [0.0, 0.0]}, "mean"),
        ({"std": [1.0, 0.0, 1.0]}, "std"),
        ({"std": "1"}, "std"),
        ({"dropout": 2}, "dropout"),
        ({"widht": 3}, "widht"),
    ],
)
def test_bad_config(change, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        WanVAEConfig.from_dict({**TINY, **change})


def test_config_round_trip():
    cfg = WanVAEConfig.from_dict({**TINY, "dropout": 0.0, "device": "cpu", "attn_scales": []})
    assert WanVAEConfig.from_dict(cfg.to_dict()) == cfg
    released = WanVAEConfig()
    assert (released.z_dim, released.spatial_factor, released.temporal_factor) == (48, 16, 4)


@pytest.mark.parametrize(
    "op, shape, kw, words",
    [
        ("encode", (1, 3, 9, 16, 24), {}, "channels last"),
        ("encode", (1, 8, 16, 24, 3), {}, "1 + 4k"),
        ("encode", (1, 9, 12, 24, 3), {}, "multiples of 8"),
        ("encode", (1, 9, 16, 24, 3), {"frames_per_step": 6}, "frames_per_step"),
        ("decode", (1, 2, 2, 3, 4), {}, "channels last"),
        ("decode", (2, 3, 3, 3), {}, "channels last"),
        ("decode", (1, 2, 2, 3, 3), {"frames_per_step": 0}, "frames_per_step"),
    ],
)
def test_bad_inputs(op, shape, kw, words):
    vae = tiny_vae()
    with pytest.raises(ValueError, match=re.escape(words)):
        getattr(vae, op)(mx.zeros(shape), **kw)


def to_reference(vae: WanVAE) -> dict:
    """Our parameters in the Wan2.2_VAE.pth names and PyTorch layouts."""
    names = [
        (".norm1.", ".residual.0."),
        (".conv1.", ".residual.2."),
        (".norm2.", ".residual.3."),
        (".conv2.", ".residual.6."),
        (".conv.", ".resample.1."),
        ("head_norm.", "head.0."),
        ("head_conv.", "head.2."),
    ]
    out = {}
    for key, v in tree_flatten(vae.parameters()):
        if key.split(".")[1:2] != ["conv1"]:  # encoder.conv1 / decoder.conv1 keep their names
            for ours, theirs in names:
                key = key.replace(ours, theirs)
        v = np.array(v)
        if key.endswith(".gamma"):
            v = v.reshape(-1, 1, 1) if ".norm." in key else v.reshape(-1, 1, 1, 1)
        elif v.ndim == 5:
            v = v.transpose(0, 4, 1, 2, 3)
        elif v.ndim == 4:
            v = v.transpose(0, 3, 1, 2)
        elif v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[key] = v
    return out


def save_pth(state, path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


def test_load_pth_and_folder(tmp_path):
    vae = tiny_vae()
    state = to_reference(vae)
    assert "encoder.middle.1.to_qkv.weight" in state and "decoder.upsamples.0.upsamples.2.resample.1.weight" in state
    save_pth(state, tmp_path / "vae.pth")
    z = video(5)
    want = np.array(vae.decode(vae.encode(z)))
    loaded = load_wan_vae(tmp_path / "vae.pth", TINY)
    assert np.allclose(np.array(loaded.decode(loaded.encode(z))), want, atol=1e-6)
    folder = save_wan_vae(loaded, tmp_path / "converted")
    again = load_wan_vae(folder)
    assert again.config == loaded.config
    assert np.allclose(np.array(again.decode(again.encode(z))), want, atol=1e-6)


@pytest.mark.parametrize("fault", ["missing", "unknown", "shape"])
def test_strict_loading(tmp_path, fault):
    state = to_reference(tiny_vae())
    key = "decoder.middle.0.residual.2.weight"
    if fault == "missing":
        del state[key]
    elif fault == "unknown":
        state[key := "decoder.extra.weight"] = np.zeros(3, np.float32)
    else:
        state[key] = state[key][:, :2]
    save_pth(state, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match=key.replace("residual.2", "conv1")):
        load_wan_vae(tmp_path / "vae.pth", TINY)


def test_strict_folder(tmp_path):
    folder = save_wan_vae(tiny_vae(), tmp_path / "converted")
    weights = mx.load(str(folder / "model.safetensors"))
    weights.pop("encoder.head_conv.bias")
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="encoder.head_conv.bias"):
        load_wan_vae(folder)
    with pytest.raises(ValueError, match="format"):
        load_wan_vae(folder, {**TINY, "format": "starflow"})


@pytest.mark.parametrize("elements", [None, 64, 3000])
def test_blocks_and_strips_agree(monkeypatch, elements):
    # The decoder evaluated block by block, its convolutions in strips of rows (1 row at 64
    # elements, a few at 3000; None: whole), gives what one graph for the step gave.
    vae = tiny_vae()
    x = video(9, h=32, w=40)
    z = vae.encode(x)
    with monkeypatch.context() as m:
        m.setattr(Decoder, "eval_blocks", False)
        want = np.array(vae.decode(z))
    if elements is not None:
        assert device.conv_strips(vae, elements) == 42  # every CausalConv3d and the resamplers' Conv2d
    tol = 1e-6 * np.abs(want).max()
    assert np.allclose(np.array(vae.decode(z)), want, rtol=0, atol=tol)
    assert np.allclose(np.array(vae.encode(x)), np.array(z), rtol=0, atol=1e-6)
    steps = list(vae.decode_steps(z))
    assert np.allclose(np.array(mx.concatenate(steps, axis=1)), want, rtol=0, atol=tol)
