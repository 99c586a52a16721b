"""Loading the SD-VAE: a diffusers AutoencoderKL folder or Hugging Face repo, its config and weights."""

import json
import warnings
from pathlib import Path

import mlx.core as mx

from ..models.vae import VAE, VAEConfig, sanitize
from .hub import download, is_repo_id, patterns
from .safetensors_reader import load_safetensors
from .strict import load_checked
from .torch_reader import load_pth


def vae_config(path) -> VAEConfig:
    """The config of a local diffusers AutoencoderKL folder (or of a pipeline folder's vae/)."""
    path = _local(Path(path))
    raw = json.loads((path / "config.json").read_text())
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path}: config is a {raw['_class_name']}, not an AutoencoderKL")
    return VAEConfig.from_dict(raw)


def _find_weights(path: Path) -> Path:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin",
    ):
        if (path / name).is_file():
            return path / name
    raise ValueError(
        f"{path}: no VAE weights found (expected diffusion_pytorch_model.safetensors or "
        f"diffusion_pytorch_model.bin); files here: {sorted(p.name for p in path.iterdir())}"
    )


def _download(repo_id: str) -> Path:
    """Fetch only the VAE config and weights of a Hugging Face repo (the repo
    itself, or the vae/ folder of a full diffusers pipeline)."""
    p = download(repo_id, None, "VAE")  # hub.PATTERNS: the files the engine reads
    if not any((q / "diffusion_pytorch_model.safetensors").is_file() for q in (p, p / "vae")):
        # Older repos ship only a .bin (read by the tensor-only reader).
        bins = ["diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin"]
        p = download(repo_id, patterns("VAE") + bins, "VAE")
    return p


def _local(p: Path) -> Path:
    """The folder holding the VAE's config.json: p itself or its vae/."""
    if not p.exists():
        raise ValueError(f"{p}: no such VAE folder")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"  # a full diffusers pipeline folder
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a diffusers AutoencoderKL folder (no config.json)")
    return p


def _resolve(path) -> Path:
    p = Path(path)
    if not p.exists() and is_repo_id(str(path)):
        p = _download(path)
    return _local(p)


def _read(weights_path: Path) -> dict:
    if weights_path.suffix == ".safetensors":
        return load_safetensors(weights_path)
    return load_pth(weights_path)


def load_vae(path, dtype=mx.float32, encoder: bool = True) -> VAE:
    """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.*)
    or a Hugging Face repo id; without `encoder`, the decoder only (what generation
    needs: the encoder's weights are never loaded). Decoding in float16 is allowed but the SD-VAE
    overflows in it (black images): prefer float32 or bfloat16."""
    if dtype == mx.float16:
        warnings.warn(
            "SD-VAE decoders overflow in float16 and give black images; use float32 or bfloat16",
            stacklevel=2,
        )
    path = _resolve(path)
    config = vae_config(path)
    weights_path = _find_weights(path)
    weights = sanitize(_read(weights_path))

    vae = VAE(config)
    if not encoder:
        vae.encoder = None
        if "quant_conv" in vae:
            del vae.quant_conv
        weights = {k: v for k, v in weights.items() if not k.startswith(("encoder.", "quant_conv."))}
    load_checked(vae, weights, weights_path, dtype)
    mx.eval(vae.parameters())
    vae.eval()
    return vae
