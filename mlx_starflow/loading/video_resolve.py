"""Video model names -> folders: a converted STARFlow-V folder, a reference checkpoint
(.pth, or a folder holding one) converted once into the cache, or the release on the
Hugging Face Hub (`apple/starflow-v`: the STARFlow-V checkpoint of the `apple/starflow`
repo); with the text encoder (T5) and the Wan2.2 VAE it names. Also the cheap test of
whether a name is a video model at all, which the command lines ask before loading.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..models.config import read_reference_yaml
from . import video
from .hub import (
    DEFAULT_MODEL,
    TEXT_SUBFOLDERS,
    ModelNotFound,
    cache_dir,
    download,
    is_repo_id,
    looks_like_path,
    shipped,
)
from .resolve import _find_config, _key

# The release: `apple/starflow-v` names the video checkpoint of Apple's one STARFlow repo.
VIDEO_MODEL = "apple/starflow-v"
VIDEO_CHECKPOINT = "starflow-v_7B_t2v_caus_480p_v3.pth"
WAN_VAE_REPO = "Wan-AI/Wan2.2-TI2V-5B"
WAN_VAE_FILE = "Wan2.2_VAE.pth"
WAN_SUBFOLDERS = ("vae", "wan_vae")
DEMO_VIDEO_NAME = "demo-video"


@dataclass
class VideoResolved:
    flow: Path  # a converted video folder
    text_encoder: Optional[str]  # a folder or repo id; None for class-conditional models
    vae: Optional[str]  # a Wan VAE folder or .pth; None for pixel models


def _config_json(folder: Path) -> Optional[dict]:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_video_folder(folder) -> bool:
    cfg = _config_json(Path(folder))
    return cfg is not None and cfg.get("format") == video.FORMAT


def _released_args(checkpoint: Path) -> Optional[dict]:
    for name, args in video.RELEASED_VIDEO.items():
        if checkpoint.stem == name or checkpoint.stem.startswith(name + "_v"):
            return args
    return None


def _checkpoint_is_video(checkpoint: Path, config=None) -> bool:
    if _released_args(checkpoint) is not None:
        return True
    try:
        cfg = _find_config(checkpoint, config)
        args = cfg if isinstance(cfg, dict) else read_reference_yaml(cfg)
    except Exception:  # no config, unreadable: the image path reports it
        return False
    return args.get("vid_size") not in (None, "none", "None", "")


def is_video_model(model: Optional[str], checkpoint: Optional[str] = None, config=None) -> bool:
    """Whether `model` names a video model, read without downloading or loading weights
    (a repo id other than apple/starflow-v counts as an image model, unless its checkpoint
    is named like the video release)."""
    model = model or DEFAULT_MODEL
    if model == VIDEO_MODEL:
        return True
    if model == DEMO_VIDEO_NAME:
        return True
    if model == "demo":
        return False
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return is_video_folder(path)
        pths = [path / checkpoint] if checkpoint else sorted(path.glob("*.pth"))
        return len(pths) == 1 and pths[0].is_file() and _checkpoint_is_video(pths[0], config)
    if path.suffix == ".pth" and path.is_file():
        return _checkpoint_is_video(path, config)
    if is_repo_id(model) and checkpoint:
        return _released_args(Path(checkpoint)) is not None
    return False


def _video_config(checkpoint: Path, config):
    if config is not None:
        return Path(config)
    released = _released_args(checkpoint)
    try:
        return _find_config(checkpoint, None)
    except ModelNotFound:
        if released is not None:
            return released
        raise


def convert_video_cached(checkpoint: Path, config=None, origin=None) -> Path:
    """Convert a reference STARFlow-V checkpoint once into the cache (atomically); later calls reuse it."""
    checkpoint = Path(checkpoint).resolve()
    cfg = _video_config(checkpoint, config)
    cfg_text = json.dumps(cfg, sort_keys=True) if isinstance(cfg, dict) else Path(cfg).read_text()
    st = checkpoint.stat()
    out = cache_dir() / f"{checkpoint.stem}-{_key(checkpoint, st.st_size, st.st_mtime_ns, cfg_text, video.FORMAT)}"
    if (out / "model.safetensors").is_file() and is_video_folder(out):
        return out
    print(f"Converting {checkpoint.name} to MLX once, into {out} ...", flush=True)
    return video.convert_starflow_video(checkpoint, cfg, out, dtype=None, force=True, origin=origin)


def _sub(folder: Optional[Path], names, need_config: bool = True) -> Optional[str]:
    if folder is None:
        return None
    for n in names:
        f = folder / n
        if (f / "config.json").is_file() if need_config else f.exists():
            return str(f)
    return None


def _wan_vae(folder: Optional[Path]) -> Optional[str]:
    """A Wan VAE beside a model: a converted vae/ folder, or Wan2.2_VAE.pth."""
    if folder is None:
        return None
    found = _sub(folder, WAN_SUBFOLDERS)
    if found:
        return found
    for f in (folder / WAN_VAE_FILE, folder / "vae" / WAN_VAE_FILE):
        if f.is_file():
            return str(f)
    return None


def _components(flow: Path, origin: Optional[Path], text_encoder, vae) -> VideoResolved:
    cfg = _config_json(flow) or {}
    text = None
    if not cfg.get("class_names"):
        text = text_encoder or _sub(origin, TEXT_SUBFOLDERS) or _sub(flow, TEXT_SUBFOLDERS) or cfg.get("text_encoder")
        if text is None:
            raise ModelNotFound(f"{flow}: the model names no text encoder; pass --text-encoder")
    wan = None
    if cfg.get("vae"):
        wan = vae or _wan_vae(origin) or _wan_vae(flow)
        if wan is None:
            wan = str(download(WAN_VAE_REPO, [WAN_VAE_FILE], "VAE") / WAN_VAE_FILE)
    return VideoResolved(flow=flow, text_encoder=text, vae=wan)


def resolve_video(
    model: str = VIDEO_MODEL,
    checkpoint: Optional[str] = None,
    config=None,
    text_encoder: Optional[str] = None,
    vae: Optional[str] = None,
) -> VideoResolved:
    """Where the video flow (converted), its text encoder and its VAE are."""
    if model == DEMO_VIDEO_NAME:
        return _components(shipped(model), None, None, None)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            if not is_video_folder(path):
                raise ValueError(
                    f"{model} is an image model, not a video model (STARFlow-V): generate images "
                    "with it (no --frames, a .png --output)"
                )
            return _components(path, path, text_encoder, vae)
        pths = [path / checkpoint] if checkpoint else sorted(path.glob("*.pth"))
        if len(pths) != 1 or not pths[0].is_file():
            found = ", ".join(p.name for p in pths) or "none"
            raise ModelNotFound(
                f"{path}: expected one converted video model (config.json + model.safetensors) or one .pth "
                f"checkpoint (found: {found}); name it with --checkpoint"
            )
        return _components(convert_video_cached(pths[0], config), path, text_encoder, vae)
    if path.suffix == ".pth":
        if not path.is_file():
            raise ModelNotFound(f"{path}: no such checkpoint")
        return _components(convert_video_cached(path, config), path.parent, text_encoder, vae)
    if looks_like_path(model) and not path.exists():
        raise ModelNotFound(f"{model}: no such file or folder")
    if is_repo_id(model):
        repo = DEFAULT_MODEL if model == VIDEO_MODEL else model
        name = checkpoint or VIDEO_CHECKPOINT
        folder = download(repo, [name, "LICENSE*"], "model")
        if not (folder / name).is_file():
            raise ModelNotFound(f"the repo '{repo}' has no file '{name}'; name the checkpoint with --checkpoint")
        flow = convert_video_cached(folder / name, config, {"repo": repo, "revision": folder.name})
        return _components(flow, None, text_encoder, vae)
    raise ModelNotFound(f"'{model}' is neither a local video model folder or checkpoint, nor a Hugging Face repo id")
