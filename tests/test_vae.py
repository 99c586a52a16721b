"""The MLX SD-VAE against diffusers' AutoencoderKL on tiny random configs."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from mlx_starflow import images  # noqa: E402
from mlx_starflow.loading import vae as V  # noqa: E402
from mlx_starflow.loading.weights import WeightsError  # noqa: E402
from mlx_starflow.models import vae as VM  # noqa: E402


def make_reference(path, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4, **kw):
    """A random diffusers AutoencoderKL saved to `path`; the norms are random
    too so swapped scale/shift or group layouts show up."""
    torch.manual_seed(len(block_out_channels) * 10 + layers_per_block)
    n = len(block_out_channels)
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        latent_channels=latent_channels,
        **kw,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def torch_decode(model, z_nhwc):
    with torch.no_grad():
        x = model.decode(torch.from_numpy(z_nhwc).permute(0, 3, 1, 2)).sample
    return x.permute(0, 2, 3, 1).numpy()


def torch_encode(model, x_nhwc):
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).latent_dist.mean
    return z.permute(0, 2, 3, 1).numpy()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(1.0, np.abs(b).max())


CONFIGS = {
    "two_levels": dict(block_out_channels=(8, 16), layers_per_block=1),
    "three_levels_two_layers": dict(block_out_channels=(8, 16, 16), layers_per_block=2),
    "no_quant_conv_no_attention": dict(
        block_out_channels=(8, 16),
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        latent_channels=3,
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(tmp_path, name):
    ref = make_reference(tmp_path, **CONFIGS[name])
    vae = V.load_vae(tmp_path)
    f, c = vae.downsample_factor, vae.config.latent_channels
    rng = np.random.default_rng(0)

    z = rng.standard_normal((2, 3, 5, c)).astype(np.float32)  # non-square latents
    got = np.array(vae.decode(mx.array(z)))
    assert got.shape == (2, 3 * f, 5 * f, 3)
    assert rel_err(got, torch_decode(ref, z)) < 1e-4

    x = rng.uniform(-1, 1, (2, 2 * f, 3 * f, 3)).astype(np.float32)
    got = np.array(vae.encode(mx.array(x)))
    assert got.shape == (2, 2, 3, c)
    assert rel_err(got, torch_encode(ref, x)) < 1e-4

    # The scaled helpers undo each other's scaling.
    zs = mx.array(z) * vae.config.scaling_factor
    assert np.allclose(np.array(VM.decode_latents(vae, zs)), np.array(vae.decode(mx.array(z))), atol=1e-5)
    assert np.allclose(
        np.array(VM.encode_image(vae, mx.array(x))), np.array(vae.encode(mx.array(x))) * vae.config.scaling_factor
    )


@pytest.mark.parametrize("budget", [1, 3000])
def test_convolution_in_strips(tmp_path, monkeypatch, budget):
    """Large inputs are convolved in strips of rows (one row each with budget 1,
    uneven strips with 3000): the same numbers as one convolution."""
    ref = make_reference(tmp_path, block_out_channels=(8, 16), layers_per_block=1)
    vae = V.load_vae(tmp_path)
    rng = np.random.default_rng(5)
    z = mx.array(rng.standard_normal((2, 5, 3, 4)).astype(np.float32))
    x = mx.array(rng.uniform(-1, 1, (1, 14, 6, 3)).astype(np.float32))
    whole_decode, whole_encode = np.array(vae.decode(z)), np.array(vae.encode(x))
    from mlx_starflow.loading import device

    assert device.conv_strips(vae, budget) > 0  # what device.prepare does on a CPU, with a tiny budget
    calls, conv2d = [], mx.conv2d
    monkeypatch.setattr(mx, "conv2d", lambda *a, **k: calls.append(a[0].shape) or conv2d(*a, **k))
    decoded, encoded = np.array(vae.decode(z)), np.array(vae.encode(x))
    assert any(shape[1] < 5 for shape in calls)  # really in strips (the smallest input has 5 rows)
    assert np.abs(decoded - whole_decode).max() < 1e-6
    assert np.abs(encoded - whole_encode).max() < 1e-6
    assert rel_err(decoded, torch_decode(ref, np.array(z))) < 1e-4


def _old_names(state_dict):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for k, v in state_dict.items():
        for new, o in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{o}.")
        out[k] = v.contiguous()
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_old_attention_names_and_bin(tmp_path, fmt):
    from safetensors.torch import save_file

    ref = make_reference(tmp_path / "new")
    sd = _old_names(ref.state_dict())
    assert any(".query." in k for k in sd)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    if fmt == "safetensors":
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, folder / "diffusion_pytorch_model.bin")
    vae = V.load_vae(folder)
    z = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    assert rel_err(np.array(vae.decode(mx.array(z))), torch_decode(ref, z)) < 1e-4


def test_bfloat16_and_float16_warning(tmp_path):
    make_reference(tmp_path)
    z = mx.array(np.random.default_rng(2).standard_normal((1, 4, 4, 4)).astype(np.float32))
    full = np.array(V.load_vae(tmp_path).decode(z))
    half = V.load_vae(tmp_path, dtype=mx.bfloat16).decode(z)
    assert half.dtype == mx.bfloat16
    assert rel_err(np.array(half.astype(mx.float32)), full) < 5e-2
    with pytest.warns(UserWarning, match="float16"):
        V.load_vae(tmp_path, dtype=mx.float16)


def test_tiled_blending_is_exact_for_a_local_decoder(tmp_path):
    """With a decoder that only looks at each pixel, tiling must change nothing:
    checks tile placement, coverage and that the blend weights sum to one."""
    make_reference(tmp_path, block_out_channels=(8, 16, 16))
    vae = V.load_vae(tmp_path)
    f = vae.downsample_factor

    def pointwise(z):
        B, h, w, _ = z.shape
        up = mx.broadcast_to(z[:, :, None, :, None, :3], (B, h, f, w, f, 3)).reshape(B, h * f, w * f, 3)
        return mx.tanh(up)

    vae._decode = pointwise
    z = mx.array(np.random.default_rng(3).standard_normal((2, 13, 10, 4)).astype(np.float32))
    for tile, overlap in [(4, 1), (5, 2), (6, 0), (8, 4)]:
        tiled = vae.decode(z, tile=tile, overlap=overlap)
        assert np.abs(np.array(tiled) - np.array(pointwise(z))).max() < 1e-6, (tile, overlap)


def test_tiled_close_to_untiled(tmp_path):
    make_reference(tmp_path, block_out_channels=(8, 16), norm_num_groups=4)
    vae = V.load_vae(tmp_path)
    z = mx.array(np.random.default_rng(4).standard_normal((1, 48, 40, 4)).astype(np.float32))
    full = np.array(vae.decode(z))
    # A tile as large as the latent is the plain decode.
    assert np.array_equal(np.array(vae.decode(z, tile=48)), full)

    # Tiles see their own group-norm statistics, attention context and zero
    # padding at their borders, so tiling approximates the full decode, better
    # with larger tiles. Random untrained weights are a harsh case: stated
    # tolerance for tile 32 / overlap 16 here is 10% mean relative error.
    def errors(tile, overlap):
        tiled = np.array(vae.decode(z, tile=tile, overlap=overlap))
        assert tiled.shape == full.shape
        err = np.abs(tiled - full)
        return err.mean() / np.abs(full).mean(), err.max() / np.abs(full).max()

    mean_small, _ = errors(16, 4)
    mean_large, max_large = errors(32, 16)
    assert mean_large < 0.1 and max_large < 0.2
    assert mean_large < mean_small
    with pytest.raises(ValueError, match="overlap"):
        vae.decode(z, tile=4, overlap=3)


def test_pil_helpers():
    x = mx.array(np.linspace(-1.2, 1.2, 2 * 8 * 16 * 3, dtype=np.float32).reshape(2, 8, 16, 3))
    ims = images.to_pil(x)
    assert len(ims) == 2 and ims[0].mode == "RGB" and ims[0].size == (16, 8)
    a = np.asarray(ims[1])
    assert a.dtype == np.uint8 and a.max() == 255 and np.asarray(ims[0]).min() == 0
    # Round trip at the same size loses only the 8-bit rounding.
    back = images.from_pil(ims)
    assert back.shape == (2, 8, 16, 3)
    assert np.abs(np.array(back) - np.clip(np.array(x), -1, 1)).max() <= 1 / 127.5 + 1e-6

    # Resize the shorter side, centre-crop the longer one.
    img = np.zeros((60, 100, 3), np.uint8)
    img[:, 40:60] = 255  # a white bar in the middle survives the centre crop
    y = images.from_pil(Image.fromarray(img), size=32)
    assert y.shape == (1, 32, 32, 3) and y.dtype == mx.float32
    assert float(y.max()) == 1.0 and float(y.min()) == -1.0 and float(y[0, 16, 16, 0]) > 0.9
    assert images.from_pil(Image.fromarray(img), size=(48, 16)).shape == (1, 16, 48, 3)
    assert images.from_pil(Image.fromarray(img)).shape == (1, 56, 96, 3)  # cropped to multiples of 8
    with pytest.raises(ValueError, match="multiple"):
        images.from_pil(Image.fromarray(img), size=30)


def test_bad_inputs(tmp_path):
    make_reference(tmp_path / "m")
    vae = V.load_vae(tmp_path / "m")
    with pytest.raises(ValueError, match="4 latent channels"):
        vae.decode(mx.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="NCHW"):
        vae.decode(mx.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="NHWC latents"):
        vae.decode(mx.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(mx.zeros((1, 5, 4, 3)))
    with pytest.raises(ValueError, match="NHWC images"):
        vae.encode(mx.zeros((1, 3, 4, 4)))

    empty = tmp_path / "config_only"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match="no VAE weights"):
        V.load_vae(empty)
    with pytest.raises(ValueError, match="no config.json"):
        V.load_vae(tmp_path)
    with pytest.raises(ValueError, match="no such VAE folder"):
        V.load_vae(tmp_path / "missing")

    # Weights from another config: strict loading names the keys.
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (empty / "config.json").write_text(json.dumps(cfg))
    (empty / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "m" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(WeightsError, match=r"missing \d+ tensors the model needs: .*resnets\.2\."):
        V.load_vae(empty)
    cfg["layers_per_block"] = 1
    cfg["mid_block_add_attention"] = False
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"\d+ tensors the model does not use: .*attentions\.0\.to_q"):
        V.load_vae(empty)


def test_pipeline_folder_and_offline_repo_id(tmp_path):
    # A full diffusers pipeline keeps the VAE in vae/.
    make_reference(tmp_path / "pipe" / "vae")
    assert V.load_vae(tmp_path / "pipe").config.latent_channels == 4
    # A repo id that is not a local folder goes to the hub; offline that is a clear error.
    code = (
        "from mlx_starflow.loading.vae import load_vae\n"
        "from mlx_starflow.loading.hub import ModelNotFound\n"
        "try:\n    load_vae('nobody/no-such-vae')\n"
        "except ModelNotFound as e:\n    assert 'Hugging Face cache' in str(e), e\n"
        "else:\n    raise SystemExit('no error')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_no_torch_import():
    code = "import mlx_starflow.models.vae, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
