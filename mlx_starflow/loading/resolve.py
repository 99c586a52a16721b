"""Model names -> folders: local folders, Hugging Face repos, and the convert-once cache.

A model is named by any of
- "demo": the small class-conditional model that ships with the package;
- "demo-video": its video counterpart (a tiny STARFlow-V, demo_video/model);
- "demo-text": the text demo, free prompts through a tiny Gemma-architecture LM (demo_text/model);
- a converted MLX folder (config.json + model.safetensors);
- a reference checkpoint (.pth) or a folder holding one, with its YAML config beside
  it or carried by the package for the released checkpoints;
- a Hugging Face repo id of the release (default "apple/starflow").
Reference checkpoints are converted once into the cache folder
($MLX_STARFLOW_CACHE, default ~/.cache/mlx-starflow) and reused with no network.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..models.config import RELEASED
from . import weights
from .hub import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MODEL,
    TEXT_SUBFOLDERS,
    VAE_SUBFOLDERS,
    ModelNotFound,
    cache_dir,
    download,
    is_repo_id,
    looks_like_path,
    patterns,
    shipped,
)
from .vae import vae_config


@dataclass
class Resolved:
    flow: Path  # a converted MLX folder
    text_encoder: Optional[str]  # a folder or a repo id, None for class-conditional models
    vae: Optional[str]  # a folder or a repo id, None for pixel models


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
    return h.hexdigest()[:16]


def released_config(checkpoint: Path) -> Optional[dict]:
    return RELEASED.get(checkpoint.stem)


def _find_config(checkpoint: Path, config):
    if config is not None:
        return Path(config)
    for cand in (checkpoint.with_suffix(".yaml"), checkpoint.with_suffix(".yml")):
        if cand.is_file():
            return cand
    yamls = sorted(checkpoint.parent.glob("*.yaml")) + sorted(checkpoint.parent.glob("configs/*.yaml"))
    named = [y for y in yamls if y.stem == checkpoint.stem]
    if named:
        return named[0]
    built_in = released_config(checkpoint)
    if built_in is not None:
        return built_in
    if len(yamls) == 1:
        return yamls[0]
    raise ModelNotFound(
        f"no config for {checkpoint.name}: put its reference YAML beside it as {checkpoint.stem}.yaml, "
        f"or pass it with --config (the package carries configs only for {', '.join(RELEASED)})"
    )


def convert_cached(checkpoint: Path, config=None, quantize=None, origin=None, vae=None) -> Path:
    """Convert a reference checkpoint once into the cache; later calls reuse it.
    The folder is written atomically, so a half-done conversion never counts.
    vae: a local VAE folder whose config sets the latent grid (see convert_starflow)."""

    checkpoint = Path(checkpoint).resolve()
    cfg = _find_config(checkpoint, config)
    cfg_text = json.dumps(cfg, sort_keys=True) if isinstance(cfg, dict) else Path(cfg).read_text()
    factor = vae_config(vae).downsample_factor if vae else None  # None: known by the VAE's name
    st = checkpoint.stat()
    key = _key(checkpoint, st.st_size, st.st_mtime_ns, cfg_text, quantize, factor, weights.CONVERSION_VERSION)
    out = cache_dir() / f"{checkpoint.stem}-{key}"
    # a folder some older converter wrote is converted again
    if (out / "model.safetensors").is_file() and weights.conversion_version(out) == weights.CONVERSION_VERSION:
        return out
    print(f"Converting {checkpoint.name} to MLX once, into {out} ...", flush=True)
    return weights.convert_starflow(
        checkpoint, cfg, out, dtype=None, force=True, quantize=quantize, origin=origin, vae=vae
    )


def _subfolder(folder: Path, names) -> Optional[str]:
    for n in names:
        if (folder / n / "config.json").is_file():
            return str(folder / n)
    return None


def _local_vae(vae, origin: Optional[Path]) -> Optional[str]:
    """The local VAE folder whose config sets the latent grid when converting: --vae if
    it is a folder, else the release folder's vae/ (a VAE named by repo id goes by its name)."""
    if vae is not None:
        return str(Path(vae).expanduser()) if Path(vae).expanduser().is_dir() else None
    return origin and _subfolder(origin, VAE_SUBFOLDERS)


def _with_components(flow: Path, origin: Optional[Path], text_encoder, vae) -> Resolved:
    cfg = json.loads((flow / "config.json").read_text())
    text = (
        None
        if cfg.get("class_names") or cfg.get("model_type") == "tarflow"
        else (
            text_encoder
            or (origin and _subfolder(origin, TEXT_SUBFOLDERS))
            or _subfolder(flow, TEXT_SUBFOLDERS)
            or cfg.get("text_encoder")
        )
    )
    v = (
        None
        if not cfg.get("vae")
        else (vae or (origin and _subfolder(origin, VAE_SUBFOLDERS)) or _subfolder(flow, VAE_SUBFOLDERS) or cfg["vae"])
    )
    return Resolved(flow=flow, text_encoder=text, vae=v)


def resolve(
    model: str = DEFAULT_MODEL,
    checkpoint: Optional[str] = None,
    config=None,
    text_encoder: Optional[str] = None,
    vae: Optional[str] = None,
    quantize=None,
) -> Resolved:
    """Where the flow (converted), the text encoder and the VAE of `model` are."""
    folder = shipped(model)
    if folder is not None:  # the demos: the text demo's LM may be given another folder
        return _with_components(folder, None, text_encoder if model == "demo-text" else None, None)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return _with_components(path, path, text_encoder, vae)
        pths = [path / checkpoint] if checkpoint else sorted(path.glob("*.pth"))
        if len(pths) != 1 or not pths[0].is_file():
            found = ", ".join(p.name for p in pths) or "none"
            raise ModelNotFound(
                f"{path}: expected one converted model (config.json + model.safetensors) or "
                f"one .pth checkpoint (found: {found}); name it with --checkpoint"
            )
        flow = convert_cached(pths[0], config, quantize, vae=_local_vae(vae, path))
        return _with_components(flow, path, text_encoder, vae)
    if path.suffix == ".pth":
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such checkpoint")
        flow = convert_cached(path, config, quantize, vae=_local_vae(vae, path.parent))
        return _with_components(flow, path.parent, text_encoder, vae)
    if looks_like_path(model) and not path.exists():
        raise ModelNotFound(f"{model}: no such file or folder")
    if is_repo_id(model):
        name = checkpoint or DEFAULT_CHECKPOINT
        folder = download(model, patterns("model", name), "model")
        ckpt = folder / name
        if not ckpt.is_file():
            raise ModelNotFound(f"the repo '{model}' has no file '{name}'; name the checkpoint with --checkpoint")
        # snapshot folders are named by the commit they hold
        origin = {"repo": model, "revision": folder.name}
        flow = convert_cached(ckpt, config, quantize, origin, vae=_local_vae(vae, None))
        return _with_components(flow, None, text_encoder, vae)
    raise ModelNotFound(
        f"'{model}' is neither 'demo', 'demo-text', 'demo-video', a local folder or checkpoint, "
        "nor a Hugging Face repo id"
    )
