"""Prompt -> image, kept loaded for apps.

    pipe = Pipeline.from_pretrained("apple/starflow", dtype="bfloat16")
    result = pipe.generate("a cat playing piano", seed=7)
    result.images[0].save("cat.png")

Stages: encode the prompt and the unconditional prompt, free the text encoder,
sample the flow (the deep block with guidance, then the shallow blocks), denoise,
decode. `generate` is serialised by a lock: concurrent calls from several threads
run one after another.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .flow import Cancelled, Flow, Jacobi, input_major
from .hub import DEFAULT_MODEL, resolve
from .weights import DTYPES, load_flow

__all__ = ["Pipeline", "Result", "Cancelled", "ClassEncoder"]

SAMPLERS = ("jacobi", "sequential")
DENOISE = ("auto", "score", "learned", "none")
# The reference image scripts' sampling settings.
DEFAULT_GUIDANCE = 3.6
DEFAULT_JACOBI = Jacobi(block_size=16, threshold=1e-3, max_iter=32)


@dataclass
class Result:
    images: list  # PIL images, prompt-major: all images of prompt 0, then prompt 1, ...
    latents: mx.array  # the flow's final samples (B, H, W, C), after denoising, before decoding
    seeds: List[int]
    prompts: List[str]
    timings: dict = field(default_factory=dict)  # seconds per stage
    peak_memory: int = 0  # bytes, MLX's peak during this call
    params: dict = field(default_factory=dict)  # everything needed to reproduce it


class ClassEncoder:
    """Prompts of a class-conditional model -> one-hot label prefixes (B, 1, classes + 1),
    the reference's label embedder; the last row is the unconditional label ("")."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.txt_size, self.width = 1, len(self.class_names) + 1

    def index(self, prompt: str) -> int:
        p = " ".join(str(prompt).lower().split())
        if p == "":
            return len(self.class_names)
        names = [" ".join(n.lower().split()) for n in self.class_names]
        if p not in names:
            valid = ", ".join(f'"{n}"' for n in self.class_names)
            raise ValueError(f'unknown prompt "{prompt}": this model knows only these {len(names)}: {valid}')
        return names.index(p)

    def encode(self, prompts) -> mx.array:
        idx = mx.array([self.index(p) for p in prompts])
        return (idx[:, None, None] == mx.arange(self.width)[None, None, :]).astype(mx.float32)

    def release(self):
        pass


def _auto_dtype(folder) -> Optional[str]:
    """The precision policy: float32 models of more than a billion parameters run in
    bfloat16 (half the memory and weight traffic); others as stored."""
    import json

    path = folder / "model.safetensors"
    with open(path, "rb") as f:  # the safetensors header: names, dtypes, offsets
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    f32 = sum(4 * int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    return "bfloat16" if f32 > 4e9 else None


def expand_seeds(seed, count: int) -> List[int]:
    """One seed per image: None draws a random base, one int n gives n, n+1, ..., or
    a list with one seed per image (a single-element list counts as one int)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    if not isinstance(seed, (int, np.integer)):
        seeds = [int(s) for s in seed]
        if len(seeds) == 1 and count > 1:
            seed = seeds[0]
        elif len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} images: give one seed, or one per image")
        else:
            return seeds
    return [int(seed) + i for i in range(count)]


def _check_prompts(prompt) -> List[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts:
        raise ValueError("give at least one prompt (a string or a non-empty list of strings)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
    return prompts


class Pipeline:
    def __init__(self, flow: Flow, text_loader: Optional[Callable] = None, vae=None,
                 keep_text_encoder: bool = False, info: Optional[dict] = None):
        self.flow = flow
        self.config = flow.config
        self.vae = vae
        self.info = info or {}
        self.keep_text_encoder = keep_text_encoder
        self._text_loader = text_loader
        self._text = ClassEncoder(self.config.class_names) if self.config.class_names else None
        self._lock = threading.Lock()
        self.vae_tile = None  # decode in tiles of this many latents

    # -- loading ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype: Optional[str] = "auto", quantize: Optional[int] = None,
                        q_group_size: int = 64, text_encoder: Optional[str] = None, vae: Optional[str] = None,
                        text_dtype: str = "float32", text_quantize: Optional[int] = None, vae_dtype: str = "float32",
                        keep_text_encoder: bool = False, checkpoint: Optional[str] = None, config=None,
                        vae_tile: Optional[int] = None):
        """Load a model by name (see `hub`): flow weights in `dtype` (None: as stored;
        "auto": bfloat16 for float32 models of more than a billion parameters, as stored otherwise),
        optionally quantized to `quantize` bits; the text encoder is loaded when first
        needed and freed after encoding unless keep_text_encoder."""
        for name, value in (("dtype", None if dtype == "auto" else dtype), ("text_dtype", text_dtype),
                            ("vae_dtype", vae_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, not {value!r}")
        for name, value in (("quantize", quantize), ("text_quantize", text_quantize)):
            if value not in (None, 4, 8):
                raise ValueError(f"{name} must be 4 or 8 bits, not {value!r}")
        if vae_tile is not None and vae_tile < 2:
            raise ValueError(f"vae_tile must be at least 2 latents, not {vae_tile}")
        q = {"bits": quantize, "group_size": q_group_size} if quantize else None
        where = resolve(model, checkpoint=checkpoint, config=config, text_encoder=text_encoder, vae=vae)
        if dtype == "auto":
            dtype = _auto_dtype(where.flow)
        flow = load_flow(where.flow, dtype=dtype, quantize=q)
        if mx.default_device() == mx.cpu:
            input_major(flow)  # float32 linears only; faster products on a CPU BLAS
        loader = None
        if where.text_encoder is not None:
            from .text import load_text_encoder

            txt_size, td = flow.config.txt_size, DTYPES[text_dtype]
            tq = {"bits": text_quantize, "group_size": q_group_size} if text_quantize else None

            def loader():
                return load_text_encoder(where.text_encoder, txt_size=txt_size, dtype=td, quantize=tq)
        vae_model = None
        if where.vae is not None:
            from .vae import load_vae

            vae_model = load_vae(where.vae, dtype=DTYPES[vae_dtype])
        info = {"model": str(model), "flow": str(where.flow), "text_encoder": where.text_encoder,
                "vae": where.vae, "dtype": dtype, "quantize": quantize}
        pipe = cls(flow, loader, vae_model, keep_text_encoder, info)
        pipe.vae_tile = vae_tile
        return pipe

    # -- the stages ---------------------------------------------------------------

    def _encoder(self):
        if self._text is None:
            if self._text_loader is None:
                raise ValueError("this model has no text encoder")
            self._text = self._text_loader()
        return self._text

    def _release_text(self):
        if self._text is not None and not isinstance(self._text, ClassEncoder) and not self.keep_text_encoder:
            self._text.release()
            self._text = None

    def encode(self, prompts: List[str]) -> mx.array:
        """Prompts -> the flow's conditioning rows (text embeddings or one-hot labels)."""
        if self.config.model_type == "tarflow":
            return mx.array([self._class_id(p) for p in prompts])
        unique = list(dict.fromkeys(prompts))
        y = self._encoder().encode(unique)
        return y[mx.array([unique.index(p) for p in prompts])]

    def _class_id(self, prompt) -> int:
        k = self.config.num_classes
        try:
            i = int(str(prompt).strip())
        except ValueError:
            i = -1
        if not 0 <= i < k:
            raise ValueError(f"this TarFlow model is class-conditional: the prompt must be a class id 0..{k - 1}")
        return i

    def latent_shape(self, height=None, width=None):
        cfg = self.config
        f = 8 if cfg.vae else 1
        size = cfg.image_size or cfg.input_size * f
        h, w = height or size, width or size
        m = f * cfg.patch_size
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} must be a multiple of {m} for this model")
        if (h, w) != (size, size) and not (cfg.mix_aspect and cfg.rope):
            raise ValueError(f"this model generates {size}x{size} images only, not {h}x{w}")
        return h // f, w // f, cfg.in_channels

    def noise(self, seeds: Sequence[int], shape) -> mx.array:
        """One standard normal draw per seed, from its own mx.random key."""
        return mx.stack([mx.random.normal(shape, key=mx.random.key(int(s))) for s in seeds])

    def decode(self, latents) -> list:
        from .vae import decode_latents, to_pil

        if self.vae is None:
            return to_pil(mx.clip(latents, -1.0, 1.0))
        out = []
        for i in range(latents.shape[0]):  # one image at a time: decode activations dominate memory
            image = mx.clip(decode_latents(self.vae, latents[i : i + 1], tile=self.vae_tile), -1.0, 1.0)
            mx.eval(image)
            out += to_pil(image)
        return out

    # -- generate -----------------------------------------------------------------

    def generate(self, prompt: Union[str, Sequence[str]], *, negative_prompt: str = "", num_images: int = 1,
                 seed: Union[None, int, Sequence[int]] = None, guidance: Optional[float] = None,
                 sampler: Optional[str] = None, jacobi_block_size: int = 16, jacobi_threshold: float = 1e-3,
                 jacobi_max_iter: int = 32, denoise: str = "auto", latents=None, height: Optional[int] = None,
                 width: Optional[int] = None, progress: Optional[Callable] = None) -> Result:
        """Generate num_images images per prompt.

        seed: one int (image i gets seed + i), one per image, or None (random).
        latents: the initial noise (B, H, W, C) instead of seeds (B = prompts x num_images).
        progress(stage, done, total) is called during each stage; returning False
        cancels the call (raises Cancelled) and leaves the pipeline usable."""
        cfg = self.config
        defaults = getattr(cfg, "sampling", None) or {}  # a model may record its own defaults
        guidance = defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else float(guidance)
        sampler = sampler or defaults.get("sampler", "jacobi")
        # Everything the user can get wrong is checked before any heavy work.
        prompts = _check_prompts(prompt)
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, not {num_images!r}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, not {guidance}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
        jacobi = Jacobi(jacobi_block_size, jacobi_threshold, jacobi_max_iter) if sampler == "jacobi" else None
        if jacobi is not None and (not cfg.sos or not cfg.rope):
            raise ValueError("this model cannot use Jacobi sampling (it needs SOS and RoPE); use sampler='sequential'")
        if denoise not in DENOISE:
            raise ValueError(f"denoise must be one of {', '.join(DENOISE)}, not {denoise!r}")
        if denoise == "learned" and not cfg.learnable_self_denoiser:
            raise ValueError("this model has no learnable denoiser: use denoise='score' or 'none'")
        if not isinstance(negative_prompt, str):
            raise ValueError("negative_prompt must be a string")
        batch_prompts = [p for p in prompts for _ in range(num_images)]
        B = len(batch_prompts)
        shape = self.latent_shape(height, width)
        if latents is not None:
            latents = mx.array(latents) if not isinstance(latents, mx.array) else latents
            if tuple(latents.shape) != (B, *shape):
                raise ValueError(f"latents must have shape {(B, *shape)} (batch, height, width, channels), "
                                 f"got {tuple(latents.shape)}")
            seeds = []
        else:
            seeds = expand_seeds(seed, B)
        if cfg.model_type == "tarflow":
            for p in prompts:
                self._class_id(p)
        elif self._text is not None and isinstance(self._text, ClassEncoder):
            for p in prompts + [negative_prompt]:
                self._text.index(p)
        if denoise == "auto":
            denoise = "none" if cfg.finetuned_vae else "learned" if cfg.learnable_self_denoiser else "score"

        with self._lock:
            return self._generate(batch_prompts, negative_prompt, seeds, latents, shape, guidance, jacobi,
                                  sampler, denoise, progress)

    def _generate(self, prompts, negative, seeds, latents, shape, guidance, jacobi, sampler, denoise, progress):
        cfg = self.config
        B = len(prompts)
        timings = {}
        mx.reset_peak_memory()

        def report(stage, done, total):
            if progress is not None and progress(stage, done, total) is False:
                raise Cancelled(stage)

        def timed(stage, fn):
            t = time.perf_counter()
            out = fn()
            mx.eval(out)
            timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t
            return out

        report("text", 0, 1)
        guided = guidance > 0
        y_cond = timed("text", lambda: self.encode(prompts))
        y = y_cond
        if guided and cfg.model_type != "tarflow":
            y_unc = timed("text", lambda: self.encode([negative] * B))
            y = mx.concatenate([y_cond, y_unc])
        self._release_text()
        report("text", 1, 1)

        x = latents if latents is not None else self.noise(seeds, shape)
        real_blocks = [i for i, n in enumerate(cfg.layers_per_block) if n > 0]
        top, n_shallow = real_blocks[-1], len(real_blocks) - 1
        marks = {"start": time.perf_counter()}

        def flow_progress(block, done, total):
            if block == top:
                report("deep", done, total)
                if done == total:
                    marks["deep"] = time.perf_counter()
            else:
                k = sorted(real_blocks[:-1], reverse=True).index(block)
                report("shallow", k * total + done, n_shallow * total)

        x = self.flow.sample(x, y, guidance=guidance, jacobi=jacobi, progress=flow_progress)
        mx.eval(x)
        end = time.perf_counter()
        deep_end = marks.get("deep", end)
        timings["deep"] = deep_end - marks["start"]
        if n_shallow:
            timings["shallow"] = end - deep_end

        if denoise != "none":
            report("denoise", 0, 1)
            if denoise == "learned":
                x = timed("denoise", lambda: self.flow.learned_denoise(x, y_cond))
            else:
                x = timed("denoise", lambda: self.flow.denoise(x, y_cond, cfg.noise_std))
            report("denoise", 1, 1)

        report("decode", 0, 1)
        t = time.perf_counter()
        images = self.decode(x)
        timings["decode"] = time.perf_counter() - t
        report("decode", 1, 1)

        params = {
            "guidance": guidance, "sampler": sampler, "denoise": denoise, "negative_prompt": negative,
            "model": self.info.get("model"), "height": shape[0] * (8 if cfg.vae else 1),
            "width": shape[1] * (8 if cfg.vae else 1),
        }
        if jacobi is not None:
            params.update(jacobi_block_size=jacobi.block_size, jacobi_threshold=jacobi.threshold,
                          jacobi_max_iter=jacobi.max_iter)
        return Result(images=images, latents=x, seeds=seeds, prompts=list(prompts), timings=timings,
                      peak_memory=mx.get_peak_memory(), params=params)
