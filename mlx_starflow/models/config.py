"""Model configs: the flow's dataclass, and reading the reference YAML configs (one concern:
what a flow is, checked before anything is built)."""

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot describe a model this engine runs."""


@contextmanager
def config_source(source):
    """Name the file in the ConfigErrors raised inside (the checks do not know it)."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith(f"{source}:"):
            raise
        raise ConfigError(f"{source}: {e}") from None


# Ranges of the flow's numbers: far beyond any released model, small enough that a
# config cannot make the engine allocate without bound before its weights are read.
LIMITS = {
    "in_channels": (1, 4096),
    "input_size": (1, 4096),
    "patch_size": (1, 64),
    "channels": (1, 65536),
    "top_channels": (1, 65536),
    "head_dim": (1, 4096),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "top_num_heads": (1, 1024),
    "top_num_kv_heads": (1, 1024),
    "top_head_dim": (0, 4096),
    "top_mlp_dim": (0, 1 << 20),
    "expansion": (1, 64),
    "pt_seq_len": (1, 65536),
    "txt_size": (0, 4096),
    "txt_dim": (0, 65536),
    "num_classes": (0, 1 << 20),
    "denoiser_layers": (0, 256),
    "image_size": (0, 65536),
    "vae_downsample": (1, 64),
    "noise_std": (0, 100),
    "soft_clip": (0, 1e6),
}
MAX_BLOCKS = 64
MAX_LAYERS = 256
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _has_type(value, annotation) -> bool:
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if annotation is bool:
        return isinstance(value, bool) or value in (0, 1) and _is_int(value)
    if annotation in (str, list, dict):
        return isinstance(value, annotation)
    args = getattr(annotation, "__args__", ())
    if len(args) == 2 and type(None) in args:  # Optional[X]
        return value is None or _has_type(value, next(a for a in args if a is not type(None)))
    return True  # a type this check does not know: left to validate


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


# The reference's `use_pretrained_lm` layouts: the deep block is a Gemma-architecture
# transformer (RMSNorm (1 + w), tanh-GELU SwiGLU, post-norms, grouped KV heads, no
# biases, a final norm, rotate-half 1-D RoPE with theta 10000 over text then image
# positions, no proj_txt: the prompt enters as the LM's scaled token embeddings).
# The name gives the structure (qk_norm) and the released sizes; a checkpoint's own
# sizes come from its weights (lm_sizes_from_shapes), so a tiny variant is just a
# smaller checkpoint. The reference applies neither Gemma 3's local/global layers nor
# Gemma 2's soft-capping here, and its use_mm_attn is taken but unused.
LM_LAYOUTS = {
    "gemma2_2b": dict(qk_norm=False, channels=2304, layers=26, heads=8, kv_heads=4, head_dim=256, mlp_dim=9216),
    "gemma3_1b": dict(qk_norm=True, channels=1152, layers=26, heads=4, kv_heads=1, head_dim=256, mlp_dim=6912),
    "gemma3_4b": dict(qk_norm=True, channels=2560, layers=34, heads=8, kv_heads=4, head_dim=256, mlp_dim=10240),
}


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
    # use_pretrained_lm: the deep block is a Gemma-architecture language model of this
    # layout (LM_LAYOUTS: its structure), its sizes in top_* (read from the weights).
    pretrained_lm: Optional[str] = None
    top_head_dim: int = 0  # the deep block's head size where it differs (an LM layout); 0: head_dim
    top_mlp_dim: int = 0  # the deep block's MLP width where set (an LM layout); 0: width * expansion
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

    @property
    def top_head_size(self) -> int:
        """The deep block's head size."""
        return self.top_head_dim or self.head_dim

    def block_has_text(self, i: int) -> bool:
        if self.txt_dim == 0:
            return False
        return i == self.num_blocks - 1 or not self.cond_top_only

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a flow config must be a JSON object of settings, not a {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown flow config keys {unknown}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_fields(self):
        """Types and ranges of every field, before any arithmetic on them: a config
        from a file may hold anything (strings, floats, lists, huge numbers)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, f.type):
                raise ConfigError(f"'{f.name}' must be {_TYPE_NAMES.get(f.type, f.type)}, not {_show(value)}")
            lo, hi = LIMITS.get(f.name, (None, None))
            if lo is not None and value is not None and not lo <= value <= hi:
                raise ConfigError(f"'{f.name}' is {_show(value)}: it must be in {lo}..{hi}")
        layers = self.layers_per_block
        if not 1 <= len(layers) <= MAX_BLOCKS or not all(_is_int(n) and 0 <= n <= MAX_LAYERS for n in layers):
            raise ConfigError(
                f"'layers_per_block' is {_show(layers)}: it must list 1..{MAX_BLOCKS} blocks of 0..{MAX_LAYERS} layers"
            )
        if self.class_names is not None and not all(isinstance(n, str) for n in self.class_names):
            raise ConfigError("'class_names' must be a list of names (strings)")
        q = self.quantization
        if q is not None and not (_is_int(q.get("bits")) and 1 <= q["bits"] <= 16 and _is_int(q.get("group_size"))):
            raise ConfigError(f"'quantization' must hold integer bits and group_size, not {_show(q)}")
        if q is not None and not 1 <= q["group_size"] <= 4096:
            raise ConfigError(f"'quantization' group_size {q['group_size']} must be in 1..4096")

    def min_weight_count(self) -> int:
        """A lower bound on the parameters the model has (its transformer layers'
        query/output projections and MLPs, the position tables): what a weights file
        must at least hold."""
        n = 0
        for i, layers in enumerate(self.layers_per_block):
            top = i == self.num_blocks - 1
            ch = self.top_channels if top else self.channels
            heads = self.top_num_heads if top else self.num_heads
            hd = self.top_head_size if top else self.head_dim
            hidden = (self.top_mlp_dim if top else 0) or int(ch * self.expansion)
            if layers and not self.rope:
                n += self.num_tokens * ch
            n += layers * (2 * ch * heads * hd + 2 * ch * hidden)
        return n

    def check_weights_size(self, nbytes: int, source):
        """Refuse a config that implies more parameters than a weights file of
        `nbytes` can hold (at 2 bytes each, or the quantized bits), before the model
        is built from it."""
        bits = self.quantization["bits"] if self.quantization else 16
        need = self.min_weight_count() * bits // 8
        if need > nbytes:
            raise ConfigError(
                f"{source}: the config ('layers_per_block' {self.layers_per_block}, 'channels' {self.channels}, "
                f"'top_channels' {self.top_channels}) implies at least {need:,} bytes of weights but the "
                f"weights file holds {nbytes:,}: the config does not belong to these weights"
            )

    def validate(self):
        self.check_fields()
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
        if self.pretrained_lm is not None:
            if self.pretrained_lm not in LM_LAYOUTS:
                raise ConfigError(f"unknown use_pretrained_lm layout {self.pretrained_lm!r}: {sorted(LM_LAYOUTS)}")
            if self.txt_dim and self.txt_dim != self.top_channels:
                raise ConfigError(
                    f"the {self.pretrained_lm} layout takes the prompt as token embeddings of the LM's width "
                    f"{self.top_channels}, not {self.txt_dim}"
                )
            if self.top_head_size % 2:
                raise ConfigError(f"the deep block's head size {self.top_head_size} must be even for RoPE")
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
    "use_pretrained_lm": None,  # an LM_LAYOUTS name: the deep block is that language model
    "use_mm_attn": 0,  # taken by the reference's deep block and never used: no effect
}
# Architectural options this engine does not implement: allowed only at these values.
_UNSUPPORTED = {
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
    if isinstance(v, bool):
        return v
    if v in (0, 1, "0", "1"):
        return bool(int(v))
    raise ConfigError(f"a flag must be 0 or 1, not {_show(v)}")


def _arg_int(a: dict, key: str, lo: int = 0, hi: int = 2**31 - 1, default=None) -> int:
    """An integer option of the reference config (YAML may give it as a string), in lo..hi;
    `default` when it is left empty."""
    v = a[key]
    if default is not None and v in (None, 0, "", "none", "None"):
        return default
    if isinstance(v, str) and v.strip().lstrip("-").isdigit() and len(v) < 20:
        v = int(v)
    elif isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        v = int(v)
    if not _is_int(v) or not lo <= v <= hi:
        raise ConfigError(f"option '{key}' is {_show(a[key])}: it must be an integer in {lo}..{hi}")
    return v


def _arg_float(a: dict, key: str) -> float:
    try:
        v = float(a[key])
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(a[key], bool) or not math.isfinite(v):
        raise ConfigError(f"option '{key}' is {_show(a[key])}: it must be a number")
    return v


def _arg_layers(v) -> list:
    """layers_per_block: "8" or "2 2 24" (or a YAML list or int)."""
    items = v if isinstance(v, list) else str(v).split()
    if not 1 <= len(items) <= MAX_BLOCKS:
        raise ConfigError(f"option 'layers_per_block' is {_show(v)}: it must list 1..{MAX_BLOCKS} blocks")
    return [_arg_int({"layers_per_block": n}, "layers_per_block", 0, MAX_LAYERS) for n in items]


def _is_default(value, default) -> bool:
    if value == default:
        return True
    if default is None:
        return value in (None, "none", "None", "")
    try:
        return float(value) == float(default)
    except (TypeError, ValueError):
        return False


def starflow_config_from_args(
    args: dict, txt_dim: int = 0, vae_downsample: Optional[int] = None, lm: Optional[dict] = None
) -> FlowConfig:
    """Build a FlowConfig from reference training arguments (as read from the YAML).

    `txt_dim` is the text width, which the reference takes from the text encoder
    and the converter reads from `proj_txt` in the weights. `vae_downsample` is the
    VAE's pixels per latent, 2 ** (levels - 1), read from its config; without it the
    VAE must be one known by name (vae_downsample_by_name). With `use_pretrained_lm`,
    `lm` holds the deep block's sizes read from the weights (lm_sizes_from_shapes;
    default: the released layout's) and the text width is the LM's.
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
    layers = _arg_layers(a["layers_per_block"])
    if not layers:
        raise ConfigError("layers_per_block is empty")
    if len(layers) == 1:
        layers = layers * _arg_int(a, "blocks", 1, MAX_BLOCKS)
    vae = a["vae"] if a["vae"] not in (None, "none", "") else None
    image_size = _arg_int(a, "img_size")
    factor = _vae_downsample(vae, vae_downsample)
    if image_size % factor:
        raise ConfigError(f"img_size {image_size} is not a multiple of the VAE's downsampling {factor}")
    input_size = image_size // factor
    patch = _arg_int(a, "patch_size", 1)
    channels = _arg_int(a, "channels", 1)
    head_dim = _arg_int(a, "head_dim", 1)
    num_heads = _arg_int(a, "num_heads") if a["num_heads"] else channels // head_dim
    num_kv = _arg_int(a, "num_kv_heads") if a["num_kv_heads"] else num_heads
    top_channels = _arg_int(a, "top_block_channels", default=channels)
    top_heads = num_heads if top_channels == channels or a["num_heads"] else top_channels // head_dim
    top_kv = num_kv if a["num_kv_heads"] else top_heads
    text = a["text"]
    txt_size = _arg_int(a, "txt_size")
    layout = None if _is_default(a["use_pretrained_lm"], None) else str(a["use_pretrained_lm"])
    lm_kwargs = {}
    if layout is not None:
        if layout not in LM_LAYOUTS:
            raise ConfigError(f"unknown use_pretrained_lm layout {layout!r}: one of {sorted(LM_LAYOUTS)}")
        sizes = {**LM_LAYOUTS[layout], **(lm or {})}
        # The reference's deep block takes every size from the layout, not from the YAML.
        layers[-1] = sizes["layers"]
        top_channels, top_heads, top_kv = sizes["channels"], sizes["heads"], sizes["kv_heads"]
        txt_dim = top_channels
        text = layout  # as the reference sets its `text`: the LM's own token embedder
        lm_kwargs = dict(pretrained_lm=layout, top_head_dim=sizes["head_dim"], top_mlp_dim=sizes["mlp_dim"])
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=_arg_int(a, "channel_size"),
        input_size=input_size,
        patch_size=patch,
        channels=channels,
        top_channels=top_channels,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        top_num_heads=top_heads,
        top_num_kv_heads=top_kv,
        layers_per_block=layers,
        rope=_flag(a["rope"]),
        pt_seq_len=_arg_int(a, "pt_seq_len", default=input_size // patch),
        sos=_flag(a["sos"]),
        seq_order=str(a["seq_order"]),
        use_softplus=_flag(a["use_softplus"]),
        cond_top_only=_flag(a["cond_top_only"]),
        use_final_norm=_flag(a["use_final_norm"]),
        soft_clip=_arg_float(a, "soft_clip"),
        use_swiglu=_flag(a["use_swiglu"]),
        use_bias=_flag(a["use_bias"]),
        use_qk_norm=_flag(a["use_qk_norm"]),
        use_post_norm=_flag(a["use_post_norm"]),
        norm_type=str(a["norm_type"]),
        txt_size=txt_size,
        txt_dim=txt_dim if txt_size > 0 else 0,
        noise_std=_arg_float(a, "noise_std"),
        learnable_self_denoiser=_flag(a["learnable_self_denoiser"]),
        conditional_denoiser=_flag(a["conditional_denoiser"]),
        mix_aspect=_flag(a["mix_aspect"]),
        finetuned_vae=not _is_default(a["finetuned_vae"], None),
        vae=vae,
        text_encoder=text,
        image_size=image_size,
        vae_downsample=factor if vae else FlowConfig.vae_downsample,
        **lm_kwargs,
    )
    cfg.validate()
    return cfg


def lm_sizes_from_shapes(shapes: dict, prefix: str, layout: str, head_dim: int) -> dict:
    """The sizes of an LM_LAYOUTS deep block from its weights' shapes (names under
    `prefix`, e.g. "blocks.5."): layers, width, heads, KV heads, head size, MLP width.

    The head size is the QK-norm width where the layout has QK-norm. Without it
    (gemma2) the weights give only heads x head size: the layout's own head size
    (256) when it divides both widths, else `head_dim` (the YAML's)."""
    if layout not in LM_LAYOUTS:
        raise ConfigError(f"unknown use_pretrained_lm layout {layout!r}: one of {sorted(LM_LAYOUTS)}")
    att = f"{prefix}attn_blocks.0."
    need = [f"{prefix}proj_in.weight", f"{att}attention.qkv.weight", f"{att}attention.proj.weight"]
    need.append(f"{att}mlp.gate_proj.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ConfigError(f"not a {layout} deep block: the weights have no {', '.join(missing)}")
    layers = len({k[len(prefix) :].split(".")[1] for k in shapes if k.startswith(f"{prefix}attn_blocks.")})
    channels = shapes[f"{prefix}proj_in.weight"][0]
    q_size = shapes[f"{att}attention.proj.weight"][1]
    kv2 = shapes[f"{att}attention.qkv.weight"][0] - q_size
    if kv2 <= 0 or kv2 % 2:
        raise ConfigError(f"{att}attention.qkv.weight does not hold queries, keys and values of equal widths")
    kv_size = kv2 // 2
    if LM_LAYOUTS[layout]["qk_norm"] and f"{att}attention.query_norm.weight" in shapes:
        hd = shapes[f"{att}attention.query_norm.weight"][0]
    else:
        candidates = [LM_LAYOUTS[layout]["head_dim"], head_dim]
        hd = next((c for c in candidates if c > 0 and q_size % c == 0 and kv_size % c == 0), 0)
    if hd <= 0 or q_size % hd or kv_size % hd:
        raise ConfigError(f"cannot split the deep block's attention widths {q_size}/{kv_size} into heads")
    return dict(
        layers=layers,
        channels=channels,
        heads=q_size // hd,
        kv_heads=kv_size // hd,
        head_dim=hd,
        mlp_dim=shapes[f"{att}mlp.gate_proj.weight"][0],
    )


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


def _index(key: str, at: int) -> int:
    """The layer number at dotted position `at` of a checkpoint key ("blocks.3.x" -> 3 at 1)."""
    parts = key.split(".")
    if len(parts) <= at or not parts[at].isdigit():
        raise ConfigError(f"not a TarFlow checkpoint: key '{key}' has no layer number at part {at + 1}")
    return int(parts[at])


def tarflow_config_from_shapes(
    shapes: dict, in_channels: int = 3, noise_std: float = 0.05, head_dim: int = 64
) -> FlowConfig:
    """Infer an apple/ml-tarflow architecture from its state-dict shapes."""
    blocks = sorted({_index(k, 1) for k in shapes if k.startswith("blocks.")})
    if not blocks or blocks != list(range(len(blocks))):
        raise ConfigError("not a TarFlow checkpoint: no consecutive 'blocks.N.' keys")
    layers = []
    for i in blocks:
        js = {_index(k, 3) for k in shapes if k.startswith(f"blocks.{i}.attn_blocks.")}
        layers.append(len(js))
    need = ["blocks.0.proj_in.weight", "blocks.0.proj_out.weight", "blocks.0.pos_embed"]
    need += ["blocks.0.attn_blocks.0.mlp.main.0.weight"] if layers[0] else []
    for k in need:  # all matrices: (out, in) weights, (positions, width) embeddings
        if k not in shapes:
            raise ConfigError(f"not a TarFlow checkpoint: missing '{k}'")
        if len(shapes[k]) != 2:
            raise ConfigError(f"'{k}' has shape {tuple(shapes[k])}; a TarFlow checkpoint has a matrix there")
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
