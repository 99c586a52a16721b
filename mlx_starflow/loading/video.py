"""STARFlow-V checkpoints: the reference .pth + YAML -> an MLX model folder, and back.

The YAML is the image flow's (read by models.config) plus the video options, which
go to a VideoConfig. Conversion is strict as for images: every tensor of the
checkpoint is used (but the buffers holding no learned state) and every parameter
of the model is loaded, or WeightsError names the keys.
"""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..models.config import ConfigError, FlowConfig, read_reference_yaml, starflow_config_from_args
from ..models.t5 import wanted as t5_wanted
from ..models.video import VideoConfig, VideoFlow, check_video_config
from ..models.wan_vae import WanVAEConfig
from .precision_policy import ClipShapes, Sizes, folder_sizes
from .quant import quant_args, quantize_like
from .safetensors_reader import load_safetensors
from .strict import WeightsError, _to_mx, check_weights, load_checked
from .torch_reader import CheckpointError, load_pth
from .weights import _model_licence, _parse_dtype, _warn_unquantized, quantize_model, sanitize, save_model

FORMAT = "starflow-video"

# Pixels per latent of the video VAEs known by name (Wan2.2's VAE: 16 spatially, 4 in time).
WAN22_DOWNSAMPLE = 16

# The reference options a video flow adds to the image ones, with their defaults.
_VIDEO_DEFAULTS = {
    "temporal_causal": 0,
    "shallow_block_local": 0,
    "denoiser_window": None,
    "local_attn_window": None,
    "vid_size": None,
    "fps_cond": 0,
    "cond_noise_level": 0,
}

# The reference configs of the released video checkpoints live in the apple/ml-starflow
# code repository, not beside the weights: their model arguments are carried here.
RELEASED_VIDEO = {
    "starflow-v_7B_t2v_caus_480p": {
        "img_size": 640,
        "txt_size": 256,
        "vid_size": "81:16",
        "fps_cond": 1,
        "channel_size": 48,
        "patch_size": 1,
        "channels": 3072,
        "top_block_channels": 4096,
        "blocks": 6,
        "layers_per_block": "2 2 2 2 2 24",
        "noise_std": 0.5,
        "nvp": 1,
        "rope": 1,
        "adaln": 0,
        "sos": 1,
        "seq_order": "L2R",
        "pt_seq_len": 32,
        "mix_aspect": 1,
        "use_softplus": 1,
        "cond_top_only": 1,
        "use_final_norm": 1,
        "learnable_self_denoiser": 1,
        "conditional_denoiser": 1,
        "denoiser_window": 10,
        "cond_noise_level": 1,
        "temporal_causal": 2,
        "shallow_block_local": 1,
        "vae": "Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6",
        "finetuned_vae": "none",
        "text": "google/flan-t5-xl",
        "cfg": 2.5,
        "soft_clip": 4,
    },
}


def _none(v):
    return None if v in (None, "none", "None", "") else v


def split_vae_name(name: Optional[str]):
    """'Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6' -> (the VAE's name, its temporal scale 0.6)."""
    if not name or ":" not in name:
        return name, 1.0
    base, extra = name.rsplit(":", 1)
    try:
        return base, float(extra)
    except ValueError:
        raise ConfigError(f"the VAE '{name}' ends in ':{extra}', not a temporal scale") from None


def video_config_from_args(args: dict, txt_dim: int = 0, vae_downsample: Optional[int] = None):
    """(FlowConfig, VideoConfig) from the reference training arguments of a video model."""
    args = dict(args)
    v = {k: args.pop(k, d) for k, d in _VIDEO_DEFAULTS.items()}
    vae, scale = split_vae_name(_none(args.get("vae")))
    if vae is None:
        raise ConfigError("a video flow needs its video VAE (the config's 'vae')")
    args["vae"] = vae
    if vae_downsample is None and "wan2.2" in vae.lower():
        vae_downsample = WAN22_DOWNSAMPLE
    cfg = starflow_config_from_args(args, txt_dim=txt_dim, vae_downsample=vae_downsample)
    frames, fps = 0, 16
    if _none(v["vid_size"]) is not None:
        try:
            frames, fps = (int(s) for s in str(v["vid_size"]).split(":"))
        except ValueError:
            raise ConfigError(f"vid_size must be 'frames:fps', not {v['vid_size']!r}") from None
    window = _none(v["denoiser_window"])
    local = _none(v["local_attn_window"])
    video = VideoConfig(
        temporal_causal=int(v["temporal_causal"]),
        shallow_block_local=bool(int(v["shallow_block_local"])),
        denoiser_window=None if window is None else int(window),
        local_attn_window=None if local is None else int(local),
        temporal_scale=scale,
        frames=frames,
        fps=fps,
        fps_cond=bool(int(v["fps_cond"])),
        cond_noise_level=bool(int(v["cond_noise_level"])),
    )
    check_video_config(cfg, video)
    return cfg, video


def video_model_from_shapes(args: dict, shapes: dict):
    """The model a reference config describes, its text width read from the weights'
    shapes (name -> shape), built without evaluating any parameter."""
    txt_keys = [k for k in shapes if k.endswith("proj_txt.weight")]
    txt_dim = int(shapes[txt_keys[0]][1]) if txt_keys else 0
    cfg, video = video_config_from_args(args, txt_dim=txt_dim)
    if cfg.txt_size > 0 and not txt_keys:
        raise WeightsError(f"the config has text (txt_size {cfg.txt_size}) but no block has proj_txt")
    return VideoFlow(cfg, video)


def convert_starflow_video(checkpoint, config, out, dtype="float32", force=False, origin=None):
    """A reference STARFlow-V .pth plus its YAML (or its arguments as a dict) -> an MLX
    model folder (config.json with the video options, model.safetensors).
    dtype None keeps the checkpoint's precision."""
    mx_dtype = _parse_dtype(dtype)
    args = dict(config) if isinstance(config, dict) else read_reference_yaml(config)
    video_config_from_args(args, txt_dim=1)  # config errors before the slow read
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    sd = load_pth(checkpoint)
    model = video_model_from_shapes(args, {k: tuple(t.shape) for k, t in sd.items()})
    used = sanitize(sd)
    check_weights(model, used, source=str(checkpoint))
    weights = {}
    for k in list(used):  # one tensor at a time, so the checkpoint is never held twice
        weights[k] = _to_mx(used.pop(k), mx_dtype)
        sd.pop(k)
        mx.eval(weights[k])
    name = "(built-in)" if isinstance(config, dict) else Path(config).name
    source = {"checkpoint": Path(checkpoint).name, "config": name, "sampling_cfg": args.get("cfg"), **(origin or {})}
    return save_model(
        out,
        model.config,
        weights,
        force=force,
        extra={"format": FORMAT, "video": model.video.to_dict(), "source": source},
        files={"LICENSE_MODEL": _model_licence(checkpoint)},
    )


def read_video_config(path):
    """(FlowConfig, VideoConfig) of a converted video model folder."""
    raw = json.loads((Path(path) / "config.json").read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is not a converted video model (format {raw.get('format')!r}, not {FORMAT!r})")
    video = VideoConfig.from_dict(raw.pop("video", {}))
    for k in ("converted_with", "source", "conversion_version", "format"):
        raw.pop(k, None)
    return FlowConfig.from_dict(raw), video


def load_video_flow(path, dtype: Optional[str] = None, quantize=None) -> VideoFlow:
    """Load a converted video model folder (strictly), float weights cast to dtype;
    quantize (bits, or {"bits", "group_size"}: quant.quant_args) quantizes its linear
    layers on the fly by the image flows' rule (weights.quantize_model)."""
    path = Path(path)
    w_path = path / "model.safetensors"
    if not (path / "config.json").is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a converted model folder (needs config.json and model.safetensors); "
            "convert a checkpoint with convert_starflow_video"
        )
    cfg, video = read_video_config(path)
    want = quant_args(quantize)
    if want and cfg.quantization and want != {k: cfg.quantization[k] for k in ("bits", "group_size")}:
        raise ValueError(f"{path} is already quantized to {cfg.quantization['bits']} bits: load the unquantized folder")
    model = VideoFlow(cfg, video)
    try:
        weights = load_safetensors(w_path)
    except Exception as e:  # mlx raises RuntimeError/ValueError on a damaged file
        raise CheckpointError(f"{w_path}: cannot read weights ({e}); the file may be truncated") from None
    if cfg.quantization:
        quantize_like(model, weights, cfg.quantization)
    load_checked(model, weights, w_path, _parse_dtype(dtype))
    del weights
    if want and not cfg.quantization:
        _warn_unquantized(quantize_model(model, **want), want["group_size"])
        cfg.quantization = want
    mx.eval(model.parameters())
    return model


def clip_shapes(flow, text=None, vae=None, size=None) -> ClipShapes:
    """What the video precision policy (precision_policy.choose_video) needs of a converted
    folder, from its config and the weights' headers (nothing loaded): for the model's own
    clip, its training length (one frame when unknown, the local window's when it has
    one) at `size` (height, width; default its square), guided. text, vae: the text
    encoder's folder and the Wan2.2 VAE's folder or .pth, where known."""
    cfg, video = read_video_config(flow)
    side = cfg.image_size or cfg.input_size * cfg.pixels_per_latent
    h, w = size or (side, side)
    factor, vae_sizes = 1, None
    if vae is not None and Path(vae).is_dir():
        raw = json.loads((Path(vae) / "config.json").read_text())
        factor = WanVAEConfig.from_dict(raw).temporal_factor
        vae_sizes = folder_sizes(vae)
    elif vae is not None and Path(vae).is_file():  # the released .pth: float32, its default layout
        n = Path(vae).stat().st_size // 4
        factor, vae_sizes = WanVAEConfig().temporal_factor, Sizes(plain=n, stored=4 * n, float32=4 * n)
    latent = 1 + (max(video.frames, 1) - 1) // factor
    if video.local_attn_window:
        latent = min(latent, video.local_attn_window)
    m = cfg.pixels_per_latent * cfg.patch_size
    text_sizes = folder_sizes(Path(text), t5_wanted) if text is not None and Path(text).is_dir() else None
    return ClipShapes(
        flow=folder_sizes(flow),
        deep_layers=int(cfg.layers_per_block[-1]),
        deep_kv_heads=cfg.top_num_kv_heads,
        head_dim=cfg.top_head_size,
        positions=(cfg.txt_size or 0) + latent * (h // m) * (w // m),
        pixels=h * w,
        text=text_sizes,
        txt_size=cfg.txt_size or 0,
        txt_dim=cfg.txt_dim or 0,
        vae=vae_sizes,
        quantized=bool(cfg.quantization),
        denoiser_heads=cfg.num_heads if cfg.learnable_self_denoiser else 0,
        denoiser_width=cfg.channels,
    )
