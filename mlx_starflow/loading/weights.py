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


# -- a use_pretrained_lm deep block initialised from a language model ----------------------------

# The names of a Gemma layer in an mlx-lm (or Hugging Face) folder -> the deep block's (LMBlock);
# q_proj, k_proj and v_proj are stacked into attention.qkv.
LM_LAYER_NAMES = {
    "input_layernorm.weight": "attention.norm.weight",
    "self_attn.q_norm.weight": "attention.query_norm.weight",
    "self_attn.k_norm.weight": "attention.key_norm.weight",
    "self_attn.o_proj.weight": "attention.proj.weight",
    "post_attention_layernorm.weight": "attention.post_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp.norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "post_feedforward_layernorm.weight": "mlp.post_norm.weight",
}
_LM_KEY = re.compile(r"^(?:language_model\.)?model\.(?:layers\.(\d+)\.(.+)|(norm\.weight))$")
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
# The deep block's own tensors, which no language model has: a new checkpoint initialises them.
LM_NEW = ("proj_in.", "proj_out.", "sos_embed")


def lm_block_weights(weights: dict, prefix: str) -> dict:
    """A Gemma language model's weights (its folder's tensor names) as the deep block's,
    under `prefix` (e.g. "blocks.5."): each layer's tensors renamed (LM_LAYER_NAMES), its
    q/k/v projections stacked into qkv, the LM's final norm as final_norm. The token
    embedding (the text embedder's), an lm_head and a vision tower are not the block's."""
    out, qkv = {}, {}
    for key, value in weights.items():
        m = _LM_KEY.match(key)
        if m is None:
            continue
        layer, name, norm = m.groups()
        if norm:
            out[f"{prefix}final_norm.weight"] = value
        elif name in _QKV:
            qkv.setdefault(int(layer), {})[name] = value
        elif name in LM_LAYER_NAMES:
            out[f"{prefix}attn_blocks.{layer}.{LM_LAYER_NAMES[name]}"] = value
        elif name.endswith((".scales", ".biases")):
            raise WeightsError(f"'{key}': a quantized language model cannot initialise a flow; use its full weights")
        else:
            raise WeightsError(f"'{key}' is not a tensor of a Gemma layer this engine knows")
    for layer, parts in qkv.items():
        if len(parts) != 3:
            raise WeightsError(f"layer {layer} of the language model lacks some of q_proj, k_proj, v_proj")
        out[f"{prefix}attn_blocks.{layer}.attention.qkv.weight"] = mx.concatenate([parts[n] for n in _QKV], axis=0)
    return out


def read_lm_folder(folder) -> tuple:
    """An mlx-lm (or Hugging Face) Gemma folder -> (its text config dict, its tensors)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise FileNotFoundError(f"{folder} is not a language-model folder (needs config.json and *.safetensors)")
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    weights = {}
    for f in files:
        weights.update(load_safetensors(f))  # headers checked before MLX reads them
    return config, weights


def lm_sizes(config: dict) -> dict:
    """The deep block's sizes (lm_sizes_from_shapes' keys) of a Gemma text config."""
    try:
        heads = int(config["num_attention_heads"])
        width = int(config["hidden_size"])
        return dict(
            layers=int(config["num_hidden_layers"]),
            channels=width,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or width // heads),
            mlp_dim=int(config["intermediate_size"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"not a Gemma text config: {e!r} missing or malformed") from None


def lm_flow_config(args: dict, lm_folder, vae_downsample: Optional[int] = None) -> FlowConfig:
    """The FlowConfig of a new use_pretrained_lm model: the reference YAML arguments (a
    dict) with the deep block's sizes from the language model's config."""
    config, _ = read_lm_folder(lm_folder)
    return starflow_config_from_args(args, vae_downsample=vae_downsample, lm=lm_sizes(config))


def init_from_lm(flow: Flow, lm_folder) -> Flow:
    """Load a Gemma language model's own layers and final norm (an mlx-lm folder) into the
    deep block of a use_pretrained_lm flow, as a new checkpoint is initialised: every
    tensor of the block but proj_in, proj_out and sos_embed is set, strictly (the LM's
    layers, widths and heads must be the block's); those three keep their values."""
    cfg = flow.config
    if not cfg.pretrained_lm:
        raise ValueError("this flow has no language-model deep block (use_pretrained_lm)")
    block = flow.blocks[-1]
    _, weights = read_lm_folder(lm_folder)
    mapped = lm_block_weights(weights, "")
    own = {k: v for k, v in tree_flatten(block.parameters()) if not k.startswith(LM_NEW)}
    check_weights(_Params(own), mapped, source=str(lm_folder))
    block.load_weights([(k, v.astype(own[k].dtype)) for k, v in mapped.items()], strict=False)
    mx.eval(block.parameters())
    return flow


class _Params:
    """The parameter dict that check_weights compares against."""

    def __init__(self, params: dict):
        self._params = params

    def parameters(self):
        return self._params
