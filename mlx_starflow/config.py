"""Model configs: the flow's dataclass, and reading the reference YAML configs."""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot describe a model this engine runs."""


@dataclass
class FlowConfig:
    """Every architectural number of a STARFlow or TarFlow model, explicit."""

    model_type: str = "starflow"  # "starflow" or "tarflow"
    in_channels: int = 4  # channels of what the flow models (latent or pixel)
    input_size: int = 32  # side of that grid (latent side with a VAE, pixels without)
    patch_size: int = 1
    channels: int = 512
    top_channels: int = 512  # the deep (top) block's width
    head_dim: int = 64
    num_heads: int = 8
    num_kv_heads: int = 8
    top_num_heads: int = 8
    top_num_kv_heads: int = 8
    layers_per_block: list = field(default_factory=lambda: [8, 8, 8, 8])
    expansion: int = 4
    rope: bool = False
    pt_seq_len: int = 32
    sos: bool = False
    seq_order: str = "R2L"
    use_softplus: bool = False
    cond_top_only: bool = False
    use_final_norm: bool = False
    soft_clip: float = 0.0
    use_swiglu: bool = False
    use_bias: bool = True
    use_qk_norm: bool = False
    use_post_norm: bool = False
    norm_type: str = "layer_norm"
    txt_size: int = 0
    txt_dim: int = 0
    num_classes: int = 0  # tarflow class embeddings
    nvp: bool = True  # tarflow: the block predicts a scale as well as a shift
    noise_std: float = 0.3
    learnable_self_denoiser: bool = False
    conditional_denoiser: bool = False
    denoiser_layers: int = 8
    mix_aspect: bool = False
    finetuned_vae: bool = False  # a fine-tuned decoder replaces the denoising step
    vae: Optional[str] = None
    text_encoder: Optional[str] = None
    # Class-conditional models (the reference's label embedder): the prompt is one of
    # these names, embedded as a one-hot text prefix of one token; the extra last
    # one-hot row is the unconditional label used for guidance.
    class_names: Optional[list] = None
    sampling: Optional[dict] = None  # recommended sampling defaults, e.g. {"guidance", "sampler", "denoise"}
    image_size: int = 0  # pixels of the generated image
    vae_downsample: int = 8  # pixels per latent along a side: 2 ** (VAE levels - 1); unused without a VAE
    quantization: Optional[dict] = None

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def pixels_per_latent(self) -> int:
        """Image pixels per flow grid cell along a side: the VAE's downsampling, 1 for pixel models."""
        return self.vae_downsample if self.vae else 1

    def flipped(self, i: int) -> bool:
        """Whether block i reverses the token order (identity and flip alternate)."""
        n = self.num_blocks
        if self.seq_order == "L2R":
            return bool((i + 1) % 2) if i < n - 1 else bool(n % 2)
        return bool(i % 2) if i < n - 1 else bool((n - 1) % 2)

    def block_has_text(self, i: int) -> bool:
        if self.txt_dim == 0:
            return False
        return i == self.num_blocks - 1 or not self.cond_top_only

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown flow config keys {unknown}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        if self.model_type not in ("starflow", "tarflow"):
            raise ConfigError(f"model_type must be 'starflow' or 'tarflow', not {self.model_type!r}")
        if self.seq_order not in ("L2R", "R2L"):
            raise ConfigError(f"seq_order must be L2R or R2L, not {self.seq_order!r}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"norm_type must be layer_norm or rms_norm, not {self.norm_type!r}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"input size {self.input_size} is not a multiple of patch size {self.patch_size}")
        for heads, kv in ((self.num_heads, self.num_kv_heads), (self.top_num_heads, self.top_num_kv_heads)):
            if kv <= 0 or heads % kv:
                raise ConfigError(f"{heads} query heads cannot share {kv} key/value heads")
        if self.rope and self.head_dim % 4:
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        # (head_dim/2 - 8 may be 0: the reference then rotates by the text position only)
        if self.rope and self.txt_size > 0 and (self.head_dim // 2 - 8 < 0 or (self.head_dim // 2 - 8) % 2):
            raise ConfigError(f"head_dim {self.head_dim} is too small for RoPE with text positions")
        if self.cond_top_only and self.txt_size == 0:
            raise ConfigError("cond_top_only needs txt_size > 0")
        if self.class_names is not None and (self.txt_size != 1 or self.txt_dim != len(self.class_names) + 1):
            raise ConfigError("a class-conditional model needs txt_size 1 and txt_dim = number of classes + 1")
        if self.layers_per_block[-1] == 0:
            raise ConfigError("the top (deep) block cannot have 0 layers")
        if self.vae_downsample < 1 or self.vae_downsample & (self.vae_downsample - 1):
            raise ConfigError(
                f"vae_downsample must be a power of two (2 ** (VAE levels - 1)), not {self.vae_downsample}"
            )


# Options of the reference training parser. Architectural ones are read; the
# unsupported ones must keep their default; training-only ones are ignored.
_DEFAULTS = {
    "channel_size": 3,
    "patch_size": 4,
    "channels": 512,
    "blocks": 4,
    "layers_per_block": "8",
    "head_dim": 64,
    "num_heads": None,
    "num_kv_heads": None,
    "rope": 0,
    "pt_seq_len": None,
    "sos": 0,
    "seq_order": "R2L",
    "use_softplus": 0,
    "cond_top_only": 0,
    "use_final_norm": 0,
    "soft_clip": 0,
    "use_swiglu": 0,
    "use_bias": 1,
    "use_qk_norm": 0,
    "use_post_norm": 0,
    "norm_type": "layer_norm",
    "learnable_self_denoiser": 0,
    "conditional_denoiser": 0,
    "noise_std": 0.3,
    "txt_size": 0,
    "mix_aspect": 0,
    "img_size": 32,
    "vae": None,
    "text": None,
    "top_block_channels": None,
    "finetuned_vae": None,
    "cfg": 0,
}
# Architectural options this engine does not implement: allowed only at these values.
_UNSUPPORTED = {
    "use_pretrained_lm": None,
    "use_mm_attn": 0,
    "temporal_causal": 0,
    "shallow_block_local": 0,
    "denoiser_window": None,
    "local_attn_window": None,
    "vid_size": None,
    "fps_cond": 0,
    "noise_type": "gaussian",
    "cond_noise_level": 0,
    "last_frame_cond": 0,
    "video_to_video": 0,
    "vae_decoder_factor": 1,
    "model_type": None,
    "vae_adapter": None,
}
_TRAINING_ONLY = {
    # Parsed by the reference but never reach its model: setup_transformer does not pass
    # adaln or nvp (its STARFlow blocks are always affine, without adaLN), and Model
    # swallows noise_embed_denoiser in **unused_kwargs.
    "adaln",
    "nvp",
    "noise_embed_denoiser",
    "model_config_path",
    "train_seed",
    "data",
    "logdir",
    "dataset",
    "wds",
    "no_flip",
    "caption_column",
    "secondary_dataset",
    "secondary_img_size",
    "secondary_vid_size",
    "secondary_batch_size",
    "secondary_ratio",
    "batch_size",
    "acc",
    "fp8",
    "use_8bit_adam",
    "epochs",
    "epoch_length",
    "lr",
    "min_lr",
    "drop_label",
    "drop_image",
    "resume_path",
    "resume_epoch",
    "warmup_steps",
    "fsdp",
    "fsdp_text_encoder",
    "gradient_checkpoint",
    "gradient_checkpoint_mlp",
    "compile",
    "latent_norm_regularization",
    "loss_scaling",
    "grad_clip",
    "grad_skip",
    "dry_run",
    "wandb_name",
    "save_every",
    "sample_freq",
    "num_samples",
    "sample_batch_size",
}

# Pixels per latent of the VAEs known by name. The reference loads any VAE named
# *sd-vae* or *sdxl-vae* as a plain SD AutoencoderKL (4 levels: 2 ** (4 - 1) = 8) and
# takes every other one's factor from its config; a converter given no VAE folder
# can only trust the name.
SD_VAE_DOWNSAMPLE = 8


def vae_downsample_by_name(name: str) -> Optional[int]:
    """The downsampling of a VAE known by its name (the SD-VAE family), else None."""
    return SD_VAE_DOWNSAMPLE if "sd-vae" in name or "sdxl-vae" in name else None


def read_reference_yaml(path) -> dict:
    """The `arguments:` list of a reference config as one flat dict."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from None
    args = data.get("arguments") if isinstance(data, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, dict) and len(a) == 1 for a in args):
        raise ConfigError(f"{path}: expected 'arguments:' followed by a list of one-key maps")
    out = {}
    for a in args:
        out.update(a)
    return out


def _flag(v) -> bool:
    return bool(int(v)) if not isinstance(v, bool) else v


def _is_default(value, default) -> bool:
    if value == default:
        return True
    if default is None:
        return value in (None, "none", "None", "")
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return False


def starflow_config_from_args(args: dict, txt_dim: int = 0, vae_downsample: Optional[int] = None) -> FlowConfig:
    """Build a FlowConfig from reference training arguments (as read from the YAML).

    `txt_dim` is the text width, which the reference takes from the text encoder
    and the converter reads from `proj_txt` in the weights. `vae_downsample` is the
    VAE's pixels per latent, 2 ** (levels - 1), read from its config; without it the
    VAE must be one known by name (vae_downsample_by_name).
    """
    for key, value in args.items():
        if key in _UNSUPPORTED:
            if not _is_default(value, _UNSUPPORTED[key]):
                raise ConfigError(
                    f"config option '{key}: {value}' is not supported by this engine "
                    f"(only the value {_UNSUPPORTED[key]!r} is)"
                )
        elif key not in _DEFAULTS and key not in _TRAINING_ONLY:
            raise ConfigError(f"unknown config option '{key}': neither architectural nor training-only")
    a = {**_DEFAULTS, **args}
    layers = [int(v) for v in str(a["layers_per_block"]).split()]
    if not layers:
        raise ConfigError("layers_per_block is empty")
    if len(layers) == 1:
        layers = layers * int(a["blocks"])
    vae = a["vae"] if a["vae"] not in (None, "none", "") else None
    image_size = int(a["img_size"])
    factor = _vae_downsample(vae, vae_downsample)
    if image_size % factor:
        raise ConfigError(f"img_size {image_size} is not a multiple of the VAE's downsampling {factor}")
    input_size = image_size // factor
    patch = int(a["patch_size"])
    channels = int(a["channels"])
    head_dim = int(a["head_dim"])
    num_heads = int(a["num_heads"]) if a["num_heads"] else channels // head_dim
    num_kv = int(a["num_kv_heads"]) if a["num_kv_heads"] else num_heads
    top_channels = int(a["top_block_channels"] or channels)
    top_heads = num_heads if top_channels == channels or a["num_heads"] else top_channels // head_dim
    txt_size = int(a["txt_size"])
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=int(a["channel_size"]),
        input_size=input_size,
        patch_size=patch,
        channels=channels,
        top_channels=top_channels,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        top_num_heads=top_heads,
        top_num_kv_heads=num_kv if a["num_kv_heads"] else top_heads,
        layers_per_block=layers,
        rope=_flag(a["rope"]),
        pt_seq_len=int(a["pt_seq_len"] or input_size // patch),
        sos=_flag(a["sos"]),
        seq_order=str(a["seq_order"]),
        use_softplus=_flag(a["use_softplus"]),
        cond_top_only=_flag(a["cond_top_only"]),
        use_final_norm=_flag(a["use_final_norm"]),
        soft_clip=float(a["soft_clip"]),
        use_swiglu=_flag(a["use_swiglu"]),
        use_bias=_flag(a["use_bias"]),
        use_qk_norm=_flag(a["use_qk_norm"]),
        use_post_norm=_flag(a["use_post_norm"]),
        norm_type=str(a["norm_type"]),
        txt_size=txt_size,
        txt_dim=txt_dim if txt_size > 0 else 0,
        noise_std=float(a["noise_std"]),
        learnable_self_denoiser=_flag(a["learnable_self_denoiser"]),
        conditional_denoiser=_flag(a["conditional_denoiser"]),
        mix_aspect=_flag(a["mix_aspect"]),
        finetuned_vae=not _is_default(a["finetuned_vae"], None),
        vae=vae,
        text_encoder=a["text"],
        image_size=image_size,
        vae_downsample=factor if vae else FlowConfig.vae_downsample,
    )
    cfg.validate()
    return cfg


def _vae_downsample(vae: Optional[str], given: Optional[int]) -> int:
    """Pixels per latent: the VAE config's factor when given, else the one known by name."""
    if vae is None:
        if given is not None:
            raise ConfigError("a VAE was given but the config has no vae: this model works in pixels")
        return 1
    if given is not None:
        return given
    known = vae_downsample_by_name(vae)
    if known is None:
        raise ConfigError(
            f"the downsampling of the VAE '{vae}' is not known by name: pass its diffusers folder "
            "(config.json) with --vae FOLDER, or put it in the release folder as vae/"
        )
    return known


def tarflow_config_from_shapes(
    shapes: dict, in_channels: int = 3, noise_std: float = 0.05, head_dim: int = 64
) -> FlowConfig:
    """Infer an apple/ml-tarflow architecture from its state-dict shapes."""
    blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConfigError("not a TarFlow checkpoint: no consecutive 'blocks.N.' keys")
    layers = []
    for i in blocks:
        js = {int(k.split(".")[3]) for k in shapes if k.startswith(f"blocks.{i}.attn_blocks.")}
        layers.append(len(js))
    need = ["blocks.0.proj_in.weight", "blocks.0.proj_out.weight", "blocks.0.pos_embed"]
    for k in need:
        if k not in shapes:
            raise ConfigError(f"not a TarFlow checkpoint: missing '{k}'")
    channels, token_dim = shapes["blocks.0.proj_in.weight"]
    if token_dim % in_channels:
        raise ConfigError(f"patch width {token_dim} is not a multiple of {in_channels} channels")
    patch = math.isqrt(token_dim // in_channels)
    if patch * patch * in_channels != token_dim:
        raise ConfigError(f"patch width {token_dim} is not channels x p x p for {in_channels} channels")
    num_patches = shapes["blocks.0.pos_embed"][0]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ConfigError(f"{num_patches} positions do not form a square grid")
    if channels % head_dim:
        raise ConfigError(f"width {channels} is not a multiple of the head size {head_dim}")
    hidden = shapes["blocks.0.attn_blocks.0.mlp.main.0.weight"][0] if layers[0] else 4 * channels
    heads = channels // head_dim
    cfg = FlowConfig(
        model_type="tarflow",
        in_channels=in_channels,
        input_size=grid * patch,
        patch_size=patch,
        channels=channels,
        top_channels=channels,
        head_dim=head_dim,
        num_heads=heads,
        num_kv_heads=heads,
        top_num_heads=heads,
        top_num_kv_heads=heads,
        layers_per_block=layers,
        expansion=hidden // channels,
        pt_seq_len=grid,
        seq_order="R2L",
        num_classes=shapes["blocks.0.class_embed"][0] if "blocks.0.class_embed" in shapes else 0,
        nvp=shapes["blocks.0.proj_out.weight"][0] == 2 * token_dim,
        noise_std=noise_std,
        image_size=grid * patch,
    )
    cfg.validate()
    return cfg


# The reference configs of the released checkpoints live in the apple/ml-starflow
# code repository, not beside the weights: their architectural arguments are
# carried here and picked by checkpoint name.
RELEASED = {
    "starflow_3B_t2i_256x256": {
        "img_size": 256,
        "txt_size": 128,
        "channel_size": 4,
        "patch_size": 1,
        "channels": 3072,
        "blocks": 6,
        "layers_per_block": "2 2 2 2 2 24",
        "noise_std": 0.3,
        "nvp": 1,
        "rope": 1,
        "adaln": 0,
        "sos": 1,
        "seq_order": "L2R",
        "use_softplus": 1,
        "cond_top_only": 1,
        "use_final_norm": 1,
        "vae": "stabilityai/sd-vae-ft-ema",
        "text": "google/flan-t5-xl",
        "cfg": 2.5,
        "soft_clip": 4,
    },
}
