"""STARFlow-V, the video flow: parity on the reference fixtures (v_tiny, v_tiny_window),
the released 7B key set against the model's parameters (shapes only, nothing
allocated), strict conversion, and density inverting sampling on a tiny random model."""

import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import yaml
from helpers import rand, randomize
from mlx.utils import tree_flatten

from mlx_starflow.loading.strict import WeightsError, check_weights
from mlx_starflow.loading.video import (
    RELEASED_VIDEO,
    convert_starflow_video,
    load_video_flow,
    video_config_from_args,
    video_model_from_shapes,
)
from mlx_starflow.loading.weights import sanitize
from mlx_starflow.models.config import ConfigError
from mlx_starflow.models.video import VideoFlow, denoiser_mask
from mlx_starflow.sample import Jacobi, OptionError
from mlx_starflow.video_sample import sample_video

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
KEYS_7B = ROOT.parent / "shared" / "starflow-v_7B_keys.tsv"

# The video recipe in miniature: 4 blocks (3 shallow, frame-local), a wider deep block
# with text, temporal-causal orders, the self-denoiser with its frame window.
ARGS = {
    "img_size": 64,
    "txt_size": 3,
    "channel_size": 4,
    "patch_size": 1,
    "channels": 32,
    "top_block_channels": 48,
    "head_dim": 24,
    "blocks": 4,
    "layers_per_block": "1 0 1 2",
    "noise_std": 0.5,
    "nvp": 1,
    "rope": 1,
    "sos": 1,
    "seq_order": "L2R",
    "use_softplus": 1,
    "cond_top_only": 1,
    "use_final_norm": 1,
    "vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
    "text": "google/flan-t5-xl",
    "cfg": 2.5,
    "soft_clip": 4,
    "temporal_causal": 2,
    "shallow_block_local": 1,
    "learnable_self_denoiser": 1,
    "conditional_denoiser": 1,
    "denoiser_window": 1,
    "vid_size": "9:16",
    "batch_size": 8,
}
TXT_DIM = 12


def tiny_video(args=None, seed=0):
    cfg, video = video_config_from_args({**ARGS, **(args or {})}, txt_dim=TXT_DIM)
    return randomize(VideoFlow(cfg, video), seed)


def clip(B=2, T=3, seed=1):
    return rand((B, T, 4, 4, 4), seed)


# -- parity -------------------------------------------------------------------------------


# -- the released 7B ---------------------------------------------------------------------------


def _released_shapes():
    shapes = {}
    for line in KEYS_7B.read_text().splitlines():
        name, shape, _kind = line.split("\t")
        shapes[name] = tuple(yaml.safe_load(shape))
    return shapes


def test_7b_key_set_converts_strictly():
    """Every tensor of the released checkpoint is a parameter of the model built from
    the released config (but the stateless buffers), shapes equal, none left out;
    the parameters stay unevaluated, so nothing of 7B is allocated."""
    if not KEYS_7B.is_file():
        pytest.skip(f"no key list at {KEYS_7B}")
    shapes = _released_shapes()
    assert len(shapes) == 558
    model = video_model_from_shapes(RELEASED_VIDEO["starflow-v_7B_t2v_caus_480p"], shapes)
    cfg, video = model.config, model.video
    assert (cfg.in_channels, cfg.input_size, cfg.channels, cfg.top_channels, cfg.txt_dim) == (48, 40, 3072, 4096, 2048)
    assert (video.temporal_causal, video.shallow_block_local, video.denoiser_window) == (2, True, 10)
    assert (video.frames, video.fps, video.temporal_scale) == (81, 16, 0.6)
    used = sanitize({k: SimpleNamespace(shape=s) for k, s in shapes.items()})
    assert set(shapes) - set(used) == {"var", "feat_rope.freqs_cos", "feat_rope.freqs_sin"} | {
        f"blocks.{i}.attn_mask" for i in range(6)
    }
    check_weights(model, used, source="starflow-v_7B_keys.tsv")
    params = dict(tree_flatten(model.parameters()))
    assert sum(int(np.prod(p.shape)) for p in params.values()) == sum(int(np.prod(s.shape)) for s in used.values())
    del used["blocks.5.proj_txt.bias"]
    with pytest.raises(WeightsError, match="missing 1 tensors"):
        check_weights(model, used)


def test_released_config_matches_the_reference_yaml():
    """RELEASED_VIDEO carries the model arguments of the reference's YAML unchanged."""
    mirror = Path("/work/.mirror/apple+ml-starflow/repo")
    if not mirror.is_dir():
        pytest.skip("no apple/ml-starflow mirror")
    text = subprocess.run(
        ["git", "-C", str(mirror), "show", "HEAD:configs/starflow-v_7B_t2v_caus_480p.yaml"],
        capture_output=True,
        text=True,
    ).stdout
    if not text:
        pytest.skip("the mirror has no starflow-v config")
    ref = {k: v for a in yaml.safe_load(text)["arguments"] for k, v in a.items()}
    for k, v in RELEASED_VIDEO["starflow-v_7B_t2v_caus_480p"].items():
        assert ref[k] == v, k


# -- conversion ----------------------------------------------------------------------------------


def _save_reference(model, args, directory, extra=None):
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
    sd["var"] = torch.ones(16, 4)
    sd["blocks.0.attn_mask"] = torch.ones(19, 19)
    sd["feat_rope.freqs_cos"] = torch.zeros(19, 24)
    sd.update(extra or {})
    ckpt, cfg = directory / "model.pth", directory / "config.yaml"
    torch.save(sd, ckpt)
    cfg.write_text(yaml.safe_dump({"arguments": [{k: v} for k, v in args.items()]}))
    return ckpt, cfg


def test_convert_round_trip(tmp_path):
    pytest.importorskip("torch")
    model = tiny_video()
    ckpt, cfg = _save_reference(model, ARGS, tmp_path)
    out = convert_starflow_video(ckpt, cfg, tmp_path / "converted")
    loaded = load_video_flow(out)
    assert loaded.video == model.video and loaded.config.to_dict() == model.config.to_dict()
    x, y = clip(), rand((2, 3, TXT_DIM), 2)
    z0, l0 = model(x, y)
    z1, l1 = loaded(x, y)
    assert mx.allclose(z0, z1).item() and mx.allclose(l0, l1).item()


def test_convert_is_strict(tmp_path):
    pytest.importorskip("torch")
    import torch

    model = tiny_video()
    ckpt, cfg = _save_reference(model, ARGS, tmp_path, extra={"blocks.3.extra.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match="does not use"):
        convert_starflow_video(ckpt, cfg, tmp_path / "a")
    args = {**ARGS, "layers_per_block": "1 1 1 2"}
    ckpt, cfg = _save_reference(model, args, tmp_path)
    with pytest.raises(WeightsError, match="missing"):
        convert_starflow_video(ckpt, cfg, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="shallow_block_local needs cond_top_only"):
        video_config_from_args({**ARGS, "cond_top_only": 0}, txt_dim=TXT_DIM)
    with pytest.raises(ConfigError, match="L2R"):
        video_config_from_args({**ARGS, "seq_order": "R2L"}, txt_dim=TXT_DIM)
    with pytest.raises(ConfigError, match="vid_size"):
        video_config_from_args({**ARGS, "vid_size": "81"}, txt_dim=TXT_DIM)
    with pytest.raises(ConfigError, match="not supported"):
        video_config_from_args({**ARGS, "last_frame_cond": 1}, txt_dim=TXT_DIM)


# -- density and sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("local, temporal", [(1, 2), (0, 1), (0, 0)])
def test_density_inverts_sampling(local, temporal):
    model = tiny_video({"shallow_block_local": local, "temporal_causal": temporal})
    noise, y = clip(), rand((2, 3, TXT_DIM), 2)
    x = sample_video(model, noise, y)
    z, _ = model(x, y)
    assert np.abs(np.array(z - noise)).max() < 1e-4
    # Jacobi run to convergence lands on the same clip.
    xj = sample_video(model, noise, y, jacobi=Jacobi(block_size=4, threshold=0.0, max_iter=64))
    assert np.abs(np.array(xj - x)).max() < 1e-4


def test_guided_sampling_is_the_image_rule_per_token():
    """With guidance, the clip's first frame does not depend on later noise (causal
    over frames), and guidance changes the sample."""
    model = tiny_video()
    noise, y = clip(B=1), rand((2, 3, TXT_DIM), 2)
    x = sample_video(model, noise, y, guidance=2.0)
    other = mx.concatenate([noise[:, :1], rand((1, 2, 4, 4, 4), 5)], axis=1)
    x2 = sample_video(model, other, y, guidance=2.0)
    assert np.abs(np.array(x2[:, 0] - x[:, 0])).max() < 1e-5
    assert np.abs(np.array(x - sample_video(model, noise, y[:1]))).max() > 1e-3


def test_local_window_needs_jacobi_and_a_context():
    model = tiny_video({"local_attn_window": 2})
    noise, y = clip(B=1, T=4), rand((1, 3, TXT_DIM), 2)
    with pytest.raises(OptionError, match="Jacobi only"):
        sample_video(model, noise, y)
    with pytest.raises(OptionError, match="context"):
        sample_video(model, noise, y, jacobi=Jacobi(), context_length=2)
    x = sample_video(model, noise, y, jacobi=Jacobi(), context_length=1)
    assert x.shape == noise.shape and np.isfinite(np.array(x)).all()
    # Within the first window, the windowed clip is the full-attention one.
    full = sample_video(tiny_video(), noise, y, jacobi=Jacobi(threshold=0.0, max_iter=64))
    xw = sample_video(model, noise, y, jacobi=Jacobi(threshold=0.0, max_iter=64), context_length=1)
    assert np.abs(np.array(xw[:, :2] - full[:, :2])).max() < 1e-4
    assert np.abs(np.array(xw[:, 2:] - full[:, 2:])).max() > 1e-4


def test_orders():
    """A flipped block reverses each frame with temporal_causal, the whole clip without."""
    seq = mx.arange(12).reshape(1, 6, 2)
    assert tiny_video().order(seq, 3, True)[0, :, 0].tolist() == [2, 0, 6, 4, 10, 8]
    assert tiny_video({"temporal_causal": 0}).order(seq, 3, True)[0, :, 0].tolist() == [10, 8, 6, 4, 2, 0]
    assert tiny_video().order(seq, 3, False)[0, :, 0].tolist() == [0, 2, 4, 6, 8, 10]


def test_denoiser_window_mask():
    # 1 text token, frames of 2 tokens, 3 frames, shift 2, window 1: frame f sees f .. f+1.
    m = np.array(denoiser_mask(1, 2, 3, 2, 1))
    assert m[:, 0].all()
    frame_of = [None, 0, 0, 1, 1, 2, 2]
    for q in range(1, 7):
        seen = {frame_of[k] for k in range(1, 7) if m[q, k]}
        assert seen == {f for f in (frame_of[q], frame_of[q] + 1) if f <= 2}
