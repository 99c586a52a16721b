"""Loading the Wan2.2 video VAE: a `Wan2.2_VAE.pth` state dict (read by the
tensor-only reader, no torch needed) or a converted folder (config.json +
*.safetensors, as `save_wan_vae` writes). Loading is strict: every checkpoint
tensor is used and every parameter loaded, or WeightsError names the keys."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..models.wan_vae import WanVAE, WanVAEConfig, sanitize
from .safetensors_reader import load_safetensors
from .strict import load_checked
from .torch_reader import load_pth

FORMAT = "wan2.2-vae"


def load_wan_vae(path, config: Optional[dict] = None, dtype: Optional[mx.Dtype] = None) -> WanVAE:
    """A WanVAE from `path`: a .pth file (its architecture from `config`, a dict of
    the reference's WanVAE_ arguments plus `mean`/`std`; None means the released
    Wan2.2_VAE.pth: dim 160, dec_dim 256, z_dim 48) or a converted folder (its own
    config.json, unless `config` is given). Float weights are cast to `dtype`
    (None keeps the checkpoint's)."""
    path = Path(path)
    if path.is_dir():
        if config is None:
            if not (path / "config.json").is_file():
                raise ValueError(f"{path}: not a converted Wan VAE folder (no config.json)")
            config = json.loads((path / "config.json").read_text())
        if config.get("format", FORMAT) != FORMAT:
            raise ValueError(f"{path}: config format is {config['format']!r}, not {FORMAT!r}")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors weights; files here: {sorted(p.name for p in path.iterdir())}")
        weights = {}
        for f in files:
            weights.update(load_safetensors(f))
    elif path.is_file():
        weights = sanitize(load_pth(path))
    else:
        raise ValueError(f"{path}: no such Wan VAE checkpoint or folder")
    model = WanVAE(WanVAEConfig.from_dict(config or {}))
    load_checked(model, weights, path, dtype)
    mx.eval(model.parameters())
    model.eval()
    return model


def save_wan_vae(model: WanVAE, out) -> Path:
    """Write a converted folder: config.json (with `format`) and model.safetensors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model.config.to_dict()}
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out
