"""Checkpoints: the one strict loader (every model loads through load_checked and
fails with WeightsError), conversion of the reference .pth files to MLX model folders
(config.json + model.safetensors), loading them back, quantizing a flow."""

import json
import os
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models.config import (
    ConfigError,
    FlowConfig,
    config_source,
    lm_sizes_from_shapes,
    read_reference_yaml,
    starflow_config_from_args,
    tarflow_config_from_shapes,
)
from ..models.flow import Flow
from .quant import quant_args, quantize_like, quantize_linear
from .safetensors_reader import load_safetensors
from .strict import WeightsError, _names, _to_mx, check_weights, load_checked  # noqa: F401 (re-exported)
from .torch_reader import CheckpointError, load_pth
from .vae import vae_config

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# The format of the folders this module writes. Bump it whenever the converter's output
# changes (names, layouts, config keys or their meaning): the convert-once cache keys
# on it, so folders written by an older converter are converted again.
# 2: vae_downsample recorded (the latent grid from the VAE), conversion_version itself.
CONVERSION_VERSION = 2

# A model's config.json is a few KB (a class list makes it tens); larger is not a config.
MAX_CONFIG_BYTES = 4 << 20

# Buffers of the reference models that carry no learned state (masks, a constant prior,
# placeholder rotary tables).
IGNORED = re.compile(r"^(var|feat_rope(_gen)?\.freqs_(cos|sin))$|(^|\.)attn_mask$")


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def sanitize(state_dict: dict) -> dict:
    """A reference flow's state dict in the Flow's names: the same names, without the
    buffers that hold no learned state (IGNORED)."""
    return {k: v for k, v in state_dict.items() if not IGNORED.search(k)}


def _parse_dtype(dtype):
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def save_model(
    out, config: FlowConfig, weights: dict, force=False, extra: Optional[dict] = None, files: Optional[dict] = None
):
    """Write config.json and model.safetensors into `out`, atomically: the folder
    appears only once complete; an existing one is replaced only with force."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = config.to_dict()
        cfg["converted_with"] = {"mlx_starflow": _version("mlx-starflow"), "mlx": _version("mlx")}
        cfg["conversion_version"] = CONVERSION_VERSION
        cfg.update(extra or {})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


LICENCE_NOTE = """These weights were converted from Apple's STARFlow release and remain under
Apple's model licence (research use only). The licence text is the LICENSE_MODEL
file of the release (apple/ml-starflow); it was not found beside the checkpoint
at conversion time.
"""


def _model_licence(checkpoint):
    """The release's licence text if it sits beside the checkpoint, else a note."""
    for name in ("LICENSE_MODEL", "LICENSE_MODEL.txt", "LICENSE", "LICENSE.txt"):
        p = Path(checkpoint).with_name(name)
        if p.is_file():
            return p.read_text()
    return LICENCE_NOTE


def convert_starflow(checkpoint, config, out, dtype="float32", force=False, quantize=None, origin=None, vae=None):
    """A reference STARFlow .pth plus its config -> an MLX model folder.

    config is the reference YAML file or its arguments as a dict; dtype None keeps
    the checkpoint's own precision; origin (e.g. the Hugging Face repo and revision)
    is recorded in config.json with the file names. vae is the local diffusers folder
    of the model's VAE: its config sets the latent grid (pixels per latent); without
    it the config's VAE must be one known by name (the SD-VAE family, 8)."""
    mx_dtype = _parse_dtype(dtype)
    quantize = quant_args(quantize)
    args = dict(config) if isinstance(config, dict) else read_reference_yaml(config)
    factor = None
    if vae is not None:
        factor = vae_config(vae).downsample_factor
    where = "the built-in config" if isinstance(config, dict) else config
    with config_source(where):
        pre = starflow_config_from_args(args, vae_downsample=factor)  # config errors before the slow read
    sd = load_pth(checkpoint)
    txt_keys = [k for k in sd if k.endswith("proj_txt.weight")]
    txt_dim = int(sd[txt_keys[0]].shape[1]) if txt_keys else 0
    lm = None
    if pre.pretrained_lm:  # the YAML names the layout only: the deep block's sizes are its weights'
        lm = lm_sizes_from_shapes(_shapes(sd), f"blocks.{pre.num_blocks - 1}.", pre.pretrained_lm, pre.head_dim)
    with config_source(where):
        cfg = starflow_config_from_args(args, txt_dim=txt_dim, vae_downsample=factor, lm=lm)
    if cfg.txt_size > 0 and not txt_keys and not cfg.pretrained_lm:
        raise WeightsError(f"{checkpoint}: the config has text (txt_size {cfg.txt_size}) but no block has proj_txt")
    name = "(built-in)" if isinstance(config, dict) else Path(config).name
    return _convert(
        Path(checkpoint),
        cfg,
        sd,
        out,
        mx_dtype,
        force,
        quantize,
        source={"checkpoint": Path(checkpoint).name, "config": name, "sampling_cfg": args.get("cfg"), **(origin or {})},
    )


def convert_tarflow(checkpoint, out, dtype="float32", force=False, in_channels=3, noise_std=None, head_dim=64):
    """A reference apple/ml-tarflow .pth -> an MLX model folder; the architecture is
    read from the weights, the noise level from the file name (…_0.07.pth) or given."""
    mx_dtype = _parse_dtype(dtype)
    sd = load_pth(checkpoint)
    if noise_std is None:
        m = re.search(r"_([0-9]*\.[0-9]+)\.pth$", Path(checkpoint).name)
        if not m:
            raise ValueError(
                f"cannot read the training noise level from '{Path(checkpoint).name}'; give it with --noise-std"
            )
        noise_std = float(m.group(1))
    cfg = tarflow_config_from_shapes(_shapes(sd), in_channels=in_channels, noise_std=noise_std, head_dim=head_dim)
    if "var" in sd and not np.allclose(np.asarray(sd["var"], dtype=np.float32), 1.0):
        raise WeightsError(f"{checkpoint}: a learned prior variance ('var') is not supported")
    return _convert(Path(checkpoint), cfg, sd, out, mx_dtype, force, None, source={"checkpoint": Path(checkpoint).name})


def _convert(checkpoint, cfg, sd, out, mx_dtype, force, quantize, source):
    out = Path(out)
    if out.exists() and not force:  # say so before the slow part
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    cfg.check_weights_size(checkpoint.stat().st_size, checkpoint)
    model = Flow(cfg)
    used = sanitize(sd)
    check_weights(model, used, source=str(checkpoint))
    weights = {}
    for k in list(used):  # one tensor at a time, so the checkpoint is never held twice
        weights[k] = _to_mx(used.pop(k), mx_dtype or None)
        sd.pop(k)
        mx.eval(weights[k])
    if quantize:
        load_checked(model, weights, checkpoint)
        _warn_unquantized(quantize_model(model, **quantize), quantize["group_size"])
        cfg.quantization = quantize
        weights = dict(tree_flatten(model.parameters()))
    licence = _model_licence(checkpoint) if cfg.model_type == "starflow" else None
    return save_model(
        out, cfg, weights, force=force, extra={"source": source}, files={"LICENSE_MODEL": licence} if licence else None
    )


def quantize_model(model: Flow, bits=4, group_size=64) -> list:
    """Quantize a flow in place by the one rule (quant.quantizable: its transformer
    linears, not proj_in/proj_out/proj_txt); returns the paths left unquantized."""
    # One transformer layer at a time, evaluated: weights loaded lazily from a file are
    # then never all resident in full precision at once (a 3B bf16 folder quantized on
    # the fly to 4 bits peaks at 9.9 GB otherwise, at about 3 GB this way). The layers are
    # listed first: named_modules() holds every submodule, so iterating it would keep each
    # replaced full-precision linear alive until the end.
    layers = [(p, m) for p, m in model.named_modules() if re.fullmatch(r"(.+\.)?attn_blocks\.\d+", p)]
    skipped = []
    for path, layer in layers:
        skipped += quantize_linear(layer, bits, group_size, prefix=f"{path}.")
        mx.eval(layer.parameters())
    skipped += quantize_linear(model, bits, group_size)  # whatever else the rule takes
    return list(dict.fromkeys(skipped))


def _warn_unquantized(paths, group_size):
    if paths:
        warnings.warn(
            f"{len(paths)} linear layers left unquantized (input width not a multiple of "
            f"{group_size}): {_names(paths, 16)}",
            stacklevel=3,
        )


def read_config(path) -> FlowConfig:
    """The FlowConfig of a converted model folder (its provenance keys dropped), its
    types and ranges checked before anything is built from it."""
    file = Path(path) / "config.json"
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{file}: {size} bytes is too large for a model config")
    try:
        raw = json.loads(file.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, 5000-digit numbers, deep nesting
        raise ConfigError(f"{file}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: must be a JSON object of settings, not a {type(raw).__name__}")
    for k in ("converted_with", "source", "conversion_version"):
        raw.pop(k, None)
    with config_source(file):
        return FlowConfig.from_dict(raw)


def conversion_version(path) -> int:
    """The CONVERSION_VERSION a model folder was written with (0 before it was recorded)."""
    try:
        return int(json.loads((Path(path) / "config.json").read_text()).get("conversion_version", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # no folder, a damaged config.json
        return 0


def load_flow(path, dtype: Optional[str] = None, quantize=None, part=None) -> Flow:
    """Load a converted model folder. dtype casts float weights; quantize (bits, or
    {"bits", "group_size"}: see quant.quant_args) quantizes on the fly; a folder
    already quantized accepts only its own quantization (its full-precision weights
    are gone). part(cfg) -> (model, rename) loads a part of the model: rename(key)
    gives a stored tensor's name in that model, or None to leave it unread (the file
    is mapped lazily: distributed.py's pipeline ranks read only their layers)."""
    path = Path(path)
    cfg_path, w_path = path / "config.json", path / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a converted model folder (needs config.json and model.safetensors); "
            "convert a checkpoint with convert/starflow.py or convert/tarflow.py"
        )
    cfg = read_config(path)
    cfg.check_weights_size(w_path.stat().st_size, cfg_path)
    want = quant_args(quantize)
    if want and cfg.quantization:
        have = {"bits": cfg.quantization["bits"], "group_size": cfg.quantization["group_size"]}
        if want != have:
            raise ValueError(
                f"{path} is already quantized to {have['bits']} bits (group size {have['group_size']}); "
                f"to quantize to {want['bits']} bits (group size {want['group_size']}), load the "
                "unquantized folder (or convert the checkpoint again)"
            )
    mx_dtype = _parse_dtype(dtype)
    model, rename = (Flow(cfg), None) if part is None else part(cfg)
    try:
        weights = load_safetensors(w_path)
    except Exception as e:  # mlx raises RuntimeError/ValueError on a damaged file
        raise CheckpointError(f"{w_path}: cannot read weights ({e}); the file may be truncated") from None
    if rename is not None:
        weights = {rename(k): v for k, v in weights.items() if rename(k) is not None}
    if cfg.quantization:
        quantize_like(model, weights, cfg.quantization)
    load_checked(model, weights, w_path, mx_dtype)
    del weights  # the lazily loaded arrays would stay resident once evaluated
    if want and not cfg.quantization:
        _warn_unquantized(quantize_model(model, **want), want["group_size"])
        cfg.quantization = want
    mx.eval(model.parameters())
    return model
