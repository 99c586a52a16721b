"""Hugging Face downloads: the files the engine reads by role, and the advice when they
cannot be had. Downloads honour HF_HOME and HF_HUB_OFFLINE."""

import os
import re
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "apple/starflow"
DEFAULT_CHECKPOINT = "starflow_3B_t2i_256x256.pth"
DEMO = Path(__file__).parents[1] / "demo" / "model"  # the demo subpackage's weights
DEMO_VIDEO = Path(__file__).parents[1] / "demo_video" / "model"  # the video demo's weights
DEMO_TEXT = Path(__file__).parents[1] / "demo_text" / "model"  # the text demo's flow and its LM's embedding
# The models that ship inside the package, by the name --model takes.
SHIPPED = {"demo": DEMO, "demo-text": DEMO_TEXT, "demo-video": DEMO_VIDEO}


def shipped(name: str) -> Optional[Path]:
    """The folder of a model that ships in the package, None for other names."""
    folder = SHIPPED.get(name)
    if folder is not None and not (folder / "model.safetensors").is_file():
        raise ModelNotFound(f"the {name} model is missing from the package ({folder}); reinstall mlx-starflow")
    return folder


TEXT_SUBFOLDERS = ("text_encoder", "t5", "flan-t5-xl")
VAE_SUBFOLDERS = ("vae", "sd-vae-ft-ema")

# The files the engine reads from a Hugging Face repo, by role: what `download` fetches
# and what the "not found" advice tells the user to fetch. ("{checkpoint}" is the .pth.)
PATTERNS = {
    "model": ("{checkpoint}", "LICENSE*"),
    "text encoder": ("*.json", "*.safetensors", "*.model", "tokenizer*"),
    # the VAE repo itself, or the vae/ folder of a full diffusers pipeline
    "VAE": (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ),
}
# The released text-to-image model: its repos and their approximate download sizes in GB
# (the checkpoint is 3.86B float32 parameters; flan-t5-xl ships encoder and decoder, the
# engine reads the encoder).
RELEASE = (
    ("model", DEFAULT_MODEL, 15.4),
    ("text encoder", "google/flan-t5-xl", 11.4),
    ("VAE", "stabilityai/sd-vae-ft-ema", 0.33),
)


class ModelNotFound(Exception):
    """Weights that are neither on disk nor downloadable: says what and how to get them."""


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_STARFLOW_CACHE", Path.home() / ".cache" / "mlx-starflow")).expanduser()


def looks_like_path(name: str) -> bool:
    """A name meant as a file or folder: it starts with '.', '/' or '~', or has more
    separators than a repo id's owner/name."""
    return name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def is_repo_id(name) -> bool:
    return (
        isinstance(name, str)
        and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
        and not looks_like_path(name)
        and not Path(name).exists()
    )


def patterns(role: str, checkpoint: str = DEFAULT_CHECKPOINT) -> list:
    return [p.format(checkpoint=checkpoint) for p in PATTERNS[role]]


def download_command(repo_id: str, files) -> str:
    """The shell command that fetches exactly `files` of a repo with the installed huggingface-hub."""
    import shlex

    import huggingface_hub

    if int(huggingface_hub.__version__.split(".")[0]) >= 1:  # 1.x replaced huggingface-cli by hf
        return " ".join(["hf download", repo_id] + [f"--include {shlex.quote(f)}" for f in files])
    return " ".join(["huggingface-cli download", repo_id, "--include"] + [shlex.quote(f) for f in files])


def download_advice(repo_id: str, files) -> str:
    """How to get a repo that is not in the cache: for the release, all three of its repos."""
    released = {repo for _, repo, _ in RELEASE}
    if repo_id not in released:
        return f"Download it where there is network:\n  {download_command(repo_id, files)}\nor pass a local folder."
    lines = [
        f"  {download_command(repo, files if repo == repo_id else patterns(role))}    (~{gb:g} GB)"
        for role, repo, gb in RELEASE
    ]
    total = sum(gb for _, _, gb in RELEASE)
    return (
        f"The released model needs three repositories, about {total:.0f} GB in all. Where there is "
        "network, fetch exactly the files the engine reads (into the Hugging Face cache, where "
        "they are found from then on; files already there are skipped):\n"
        + "\n".join(lines)
        + "\nOr pass local folders (--model, --text-encoder, --vae), or try the bundled model: --model demo."
    )


def download(repo_id: str, files, what: str) -> Path:
    """snapshot_download of only `files` (glob patterns; None: the PATTERNS of the role
    `what`), with one clear error when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    files = patterns(what) if files is None else list(files)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=files))
    except (HfHubHTTPError, OSError, ValueError) as e:  # offline, no network, no such repo, gated
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = (
            "HF_HUB_OFFLINE is set: unset it to download"
            if offline
            else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )
        raise ModelNotFound(
            f"{what} '{repo_id}' is not in the local Hugging Face cache and could not be downloaded ({why}). "
            + download_advice(repo_id, files)
        ) from None
