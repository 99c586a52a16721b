"""Prompt -> image, kept loaded for apps (one concern: the resident pipeline and its stages).

    pipe = Pipeline.from_pretrained("apple/starflow", dtype="bfloat16")
    result = pipe.generate("a cat playing piano", seed=7)
    result.images[0].save("cat.png")

Stages: encode the prompt and the unconditional prompt, free the text encoder,
sample the flow (the deep block with guidance, then the shallow blocks), denoise,
decode. `generate` is serialised by a lock: concurrent calls from several threads
run one after another.
"""

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from . import editing, likelihood
from .images import to_pil
from .loading import device, precision_policy
from .loading.hub import DEFAULT_MODEL
from .loading.quant import quant_args
from .loading.resolve import resolve
from .loading.text import load_text_encoder, text_tokenizer
from .loading.vae import load_vae, vae_config
from .loading.weights import DTYPES, load_flow, read_config
from .models.flow import Flow
from .models.vae import encode_image, unscale
from .options import (
    DEFAULT_GUIDANCE,
    MAX_BATCH,
    Cancelled,
    Event,
    GenerateOptions,
    LoadOptions,
    OptionError,
    Result,
    check_prompts,
    drive,
    expand_seeds,
)
from .sample import sample_steps

__all__ = [
    "Pipeline",
    "Result",
    "Cancelled",
    "ClassEncoder",
    "GenerateOptions",
    "LoadOptions",
    "Event",
    "check_prompts",
    "drive",
    "expand_seeds",
]


class ClassEncoder:
    """Prompts of a class-conditional model -> its conditioning, the one path from a
    prompt to a class. A prompt is a class name (case and spaces ignored) or a class
    id. Models with class names (the demo) take a one-hot text prefix
    (B, 1, classes + 1), the reference's label embedder, whose last row is the
    unconditional label (""); TarFlow models take the class ids (B,)."""

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, one_hot: bool = True):
        self.class_names = list(class_names) if class_names else None
        self.num_classes = num_classes
        self.one_hot = one_hot
        self.txt_size, self.width = 1, num_classes + 1

    @classmethod
    def for_config(cls, cfg) -> Optional["ClassEncoder"]:
        if cfg.class_names:
            return cls(len(cfg.class_names), cfg.class_names, one_hot=True)
        if cfg.model_type == "tarflow" and cfg.num_classes:
            return cls(cfg.num_classes, None, one_hot=False)
        return None

    @property
    def labels(self) -> List[str]:
        """Every class as a prompt."""
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]

    def index(self, prompt) -> int:
        p = " ".join(str(prompt).lower().split())
        if p == "" and self.one_hot:
            return self.num_classes
        if self.class_names:
            names = [" ".join(n.lower().split()) for n in self.class_names]
            if p in names:
                return names.index(p)
        try:
            i = int(p)
        except ValueError:
            i = -1
        if 0 <= i < self.num_classes:
            return i
        if self.class_names:
            valid = ", ".join(f'"{n}"' for n in self.class_names)
            raise ValueError(f'unknown prompt "{prompt}": this model knows only these {self.num_classes}: {valid}')
        raise ValueError(
            f'unknown class "{prompt}": this model is class-conditional; '
            f"the prompt must be a class id 0..{self.num_classes - 1}"
        )

    def encode(self, prompts) -> mx.array:
        return self.rows(mx.array([self.index(p) for p in prompts]))

    def rows(self, ids) -> mx.array:
        """Class ids (B,) -> the conditioning rows; id num_classes is unconditional."""
        ids = ids if isinstance(ids, mx.array) else mx.array(ids)
        if not self.one_hot:
            return ids
        return (ids[:, None, None] == mx.arange(self.width)[None, None, :]).astype(mx.float32)

    def release(self):
        pass


BF16_ABOVE = 4e9  # bytes of float32 weights (a billion parameters) above which "auto" is bfloat16


def _progress(stage: str, steps: Generator):
    """Forward a (done, total) generator as Events of `stage`, all but its end (which the
    stage reports itself); returns the generator's value."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if done < total:
            yield Event(stage, done, total)


def _auto_dtype(folder) -> Optional[str]:
    """The GPU's rule of the precision policy: float32 models of more than a billion
    parameters run in bfloat16 (half the memory and weight traffic); others as stored."""
    sizes = precision_policy.folder_sizes(folder)
    return "bfloat16" if sizes is not None and sizes.float32 > BF16_ABOVE else None


class Pipeline:
    def __init__(
        self,
        flow: Flow,
        text_loader: Optional[Callable] = None,
        vae=None,
        keep_text_encoder: bool = False,
        info: Optional[dict] = None,
        vae_loader: Optional[Callable] = None,
        flow_loader: Optional[Callable] = None,
        config=None,
        low_memory: bool = False,
    ):
        self._flow = flow
        self._flow_loader = flow_loader  # () -> Flow: the flow is loaded when first needed
        self.config = flow.config if flow is not None else config
        self.low_memory = low_memory  # the text encoder, the flow and the VAE each loaded per stage and freed
        self.vae = vae  # the decoder (and the encoder once an image was encoded)
        self.info = info or {}
        self.keep_text_encoder = keep_text_encoder
        self._text_loader = text_loader
        self._vae_loader = vae_loader  # (encoder: bool) -> VAE
        self.classes = ClassEncoder.for_config(self.config)
        self._text = None
        self._lock = threading.RLock()
        self.vae_tile = None  # decode in tiles of this many latents
        self.tokenizer = None  # the text encoder's tokenizer, for checking prompts before encoding
        self.examples = None  # example prompts of a text model (its folder's examples.txt)

    # -- loading ---------------------------------------------------------------

    @property
    def flow(self) -> Flow:
        """The flow, loaded on first use when the pipeline was made without it (low_memory)."""
        if self._flow is None:
            if self._flow_loader is None:
                raise ValueError("this pipeline has no flow")
            self._flow = self._flow_loader()
            self.config = self._flow.config
        return self._flow

    @flow.setter
    def flow(self, flow: Flow):
        self._flow = flow

    def _free(self):
        gc.collect()
        mx.clear_cache()

    def _release_flow(self):
        """In low-memory mode, free the flow (it is loaded again when next needed)."""
        if self.low_memory and self._flow is not None and self._flow_loader is not None:
            self._flow = None
            self._free()

    def _release_vae(self):
        if self.low_memory and self.vae is not None and self._vae_loader is not None:
            self.vae = None
            self._free()

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        dtype: Optional[str] = "auto",
        quantize: Optional[int] = None,
        q_group_size: int = 64,
        text_encoder: Optional[str] = None,
        vae: Optional[str] = None,
        text_dtype: str = "auto",
        text_quantize: Optional[int] = None,
        vae_dtype: str = "float32",
        keep_text_encoder: bool = False,
        checkpoint: Optional[str] = None,
        config=None,
        vae_tile: Optional[int] = None,
        flow_loader: Optional[Callable] = None,
        low_memory: bool = False,
    ):
        """Load a model by name (see `hub`): flow weights in `dtype` (None: as stored;
        "auto": the precision policy, loading/precision_policy.py: the device and its
        memory choose the flow's and the text encoder's precision, `info["precision"]`
        says which and why), optionally quantized to `quantize` bits; text_dtype "auto"
        follows the flow's. The text encoder is loaded when first needed and freed after
        encoding unless keep_text_encoder. low_memory: the flow is loaded after the prompts
        are encoded and freed before decoding, the VAE loaded per decode and freed (the
        call's peak is its largest stage's). flow_loader(folder, dtype=, quantize=) replaces
        weights.load_flow (distributed.py loads a rank's part)."""
        load = LoadOptions(
            model=model,
            checkpoint=checkpoint,
            config=config,
            text_encoder=text_encoder,
            vae=vae,
            dtype=dtype,
            quantize=quantize,
            q_group_size=q_group_size,
            text_dtype=text_dtype,
            text_quantize=text_quantize,
            vae_dtype=vae_dtype,
            vae_tile=vae_tile,
            keep_text_encoder=keep_text_encoder,
            low_memory=low_memory,
        )
        try:
            load.validate()
        except ValueError as e:
            raise ValueError(str(e)) from None
        if dtype is not None and dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        where = resolve(model, checkpoint=checkpoint, config=config, text_encoder=text_encoder, vae=vae)
        auto = dtype == "auto" or text_dtype == "auto"
        if auto:
            text_folder = where.text_encoder if where.text_encoder and Path(where.text_encoder).is_dir() else None
            vae_folder = where.vae if where.vae and Path(where.vae).is_dir() else None
            shapes = precision_policy.Shapes.of_folders(where.flow, text_folder, vae_folder)
            choice = precision_policy.choose(
                shapes,
                one_shot=low_memory,
                dtype=dtype,
                quantize=quantize,
                text_dtype=text_dtype,
                text_quantize=text_quantize,
            )
            dtype, quantize = choice.dtype, choice.quantize
            text_dtype, text_quantize = choice.text_dtype, choice.text_quantize
        quants = {}
        for name, value in (("quantize", quantize), ("text_quantize", text_quantize)):
            try:  # the one quantization policy (quant.py)
                quants[name] = quant_args({"bits": value, "group_size": q_group_size} if value else None)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        q, tq = quants["quantize"], quants["text_quantize"]

        def flow_load():
            return device.prepare((flow_loader or load_flow)(where.flow, dtype=dtype, quantize=q))

        flow = None if low_memory else flow_load()
        loader = None
        flow_cfg = read_config(where.flow)
        lm_text = bool(flow_cfg.pretrained_lm)  # the prompt is the LM's own token embeddings
        if lm_text and (where.text_encoder is None or where.text_encoder == flow_cfg.text_encoder):
            raise ValueError(
                f"this model's deep block is a {flow_cfg.pretrained_lm} language model and its prompt the LM's "
                "token embeddings: give the LM's folder (mlx-lm format, with its tokenizer) with --text-encoder, "
                "or put it beside the model as text_encoder/"
            )
        if where.text_encoder is not None:
            txt_size, td = flow_cfg.txt_size, DTYPES[text_dtype]
            mode = "embed" if lm_text else None

            def loader():
                enc = load_text_encoder(where.text_encoder, txt_size=txt_size, dtype=td, quantize=tq, mode=mode)
                if enc.width != flow_cfg.txt_dim:
                    enc.release()
                    raise ValueError(
                        f"the text encoder {where.text_encoder} gives width {enc.width}, "
                        f"the model takes {flow_cfg.txt_dim}"
                    )
                return enc

        vae_loader = None
        if where.vae is not None:

            def vae_loader(encoder: bool):
                return device.prepare(load_vae(where.vae, dtype=DTYPES[vae_dtype], encoder=encoder))

        info = {
            "model": str(model),
            "flow": str(where.flow),
            "text_encoder": where.text_encoder,
            "vae": where.vae,
            "dtype": dtype,
            "quantize": quantize,
            "text_dtype": text_dtype,
            "text_quantize": text_quantize,
            "low_memory": low_memory,
        }
        if auto:
            info["precision"], info["precision_peak"] = choice.line, choice.peak
        cfg = read_config(where.flow) if flow is None else flow.config
        decoder = vae_loader(False) if vae_loader and not low_memory else None
        factor = None
        if where.vae is not None:
            factor = decoder.downsample_factor if decoder is not None else vae_config(where.vae).downsample_factor
        if factor is not None and factor != cfg.pixels_per_latent:
            raise ValueError(
                f"the VAE {where.vae} downsamples by {factor} but the model was converted "
                f"for {cfg.pixels_per_latent}; convert it again with this VAE (--vae FOLDER)"
            )
        pipe = cls(flow, loader, decoder, keep_text_encoder, info, vae_loader, flow_load, cfg, low_memory)
        pipe.vae_tile = vae_tile
        if where.text_encoder is not None:  # a word-level vocabulary (the text demo) names unknown words
            pipe.tokenizer = text_tokenizer(where.text_encoder)
        examples = Path(where.flow) / "examples.txt"  # a model may suggest prompts (the web page shows them)
        if examples.is_file():
            pipe.examples = [line.strip() for line in examples.read_text().splitlines() if line.strip()][:32]
        return pipe

    # -- the stages ---------------------------------------------------------------

    def _encoder(self):
        if self.classes is not None:
            return self.classes
        if self._text is None:
            if self._text_loader is None:
                raise ValueError("this model has no text encoder")
            self._release_flow()  # low memory: the text encoder is never beside the flow
            self._text = self._text_loader()
        return self._text

    def _release_text(self):
        if self._text is not None and not self.keep_text_encoder:
            self._text.release()
            self._text = None

    @contextmanager
    def exclusive(self, keep_text_encoder: bool = False):
        """Hold the pipeline for a sequence of calls (no other thread's call runs in between);
        keep_text_encoder: keep the text encoder loaded until the block ends (one load for
        several encodings), then free it unless the pipeline keeps it."""
        with self._lock:
            keep = self.keep_text_encoder
            self.keep_text_encoder = keep or keep_text_encoder
            try:
                yield self
            finally:
                self.keep_text_encoder = keep
                self._release_text()

    def check_prompts(self, prompts: Sequence[str]):
        """For class-conditional models, every prompt must name a class; for a text
        encoder with a word-level vocabulary (the text demo), every word must be one
        it knows."""
        if self.classes is not None:
            for p in prompts:
                self.classes.index(p)
        elif self.tokenizer is not None:
            unknown = [w for p in prompts for w in self.tokenizer.unknown_words(p)]
            if unknown:
                words = ", ".join(f'"{w}"' for w in dict.fromkeys(unknown))
                raise ValueError(
                    f"the demo does not know: {words} (it knows words of shapes, colours, sizes and places)"
                )

    def encode(self, prompts: List[str]) -> mx.array:
        """Prompts -> the flow's conditioning rows (text embeddings, one-hot labels or
        class ids). Each distinct prompt is encoded once."""
        with self._lock:
            unique = list(dict.fromkeys(prompts))
            y = self._encoder().encode(unique)
            return y[mx.array([unique.index(p) for p in prompts])]

    def conditioning(self, prompts: List[str], negative_prompt: str = "", guided: bool = False):
        """(y for sampling, y_cond): the conditional rows, followed when guiding by the
        rows of the negative prompt (STARFlow: [cond; uncond]; TarFlow takes the
        unconditional rows from its mean class embedding). Frees the text encoder
        unless keep_text_encoder."""
        with self._lock:
            try:
                y_cond = self.encode(prompts)
                y = y_cond
                if guided and self.config.txt_dim:
                    y = mx.concatenate([y_cond, self.encode([negative_prompt] * len(prompts))])
                mx.eval(y)
            finally:
                self._release_text()
            return y, y_cond

    def image_size(self) -> int:
        cfg = self.config
        return cfg.image_size or cfg.input_size * cfg.pixels_per_latent

    def latent_shape(self, height=None, width=None):
        cfg = self.config
        f = cfg.pixels_per_latent
        size = self.image_size()
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

    def decode_steps(self, latents) -> Generator[Tuple[int, int], None, list]:
        """Latents -> PIL images, one image at a time (decode activations dominate memory),
        yielding (images done, images) after each so a caller can stop between them; returns
        the images. In low-memory mode the decoder is loaded for the call and freed."""
        if self.vae is None and self.low_memory and self._vae_loader is not None:
            mx.eval(latents)
            self.vae = self._vae_loader(False)
        if self.vae is None:
            return to_pil(mx.clip(latents, -1.0, 1.0))
        out = []
        try:
            n = latents.shape[0]
            for i in range(n):
                tiles = self.vae.decode_steps(unscale(self.vae, latents[i : i + 1]), tile=self.vae_tile)
                while True:
                    try:
                        next(tiles)
                    except StopIteration as stop:
                        image = mx.clip(stop.value, -1.0, 1.0)
                        break
                    yield i, n  # a tile done: a caller may stop here
                mx.eval(image)
                out += to_pil(image)
                yield i + 1, n
        finally:
            self._release_vae()
        return out

    def decode(self, latents) -> list:
        """Latents -> PIL images (decode_steps run to the end)."""
        steps = self.decode_steps(latents)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def encode_images(self, images: mx.array) -> mx.array:
        """Images (B, H, W, 3) in [-1, 1] -> what the flow models: the VAE's scaled
        posterior mean for STARFlow (the encoder is loaded on first use), the pixels
        themselves for pixel models."""
        if self.config.vae is None:
            return images
        with self._lock:
            if self.vae is None or getattr(self.vae, "encoder", None) is None:
                if self._vae_loader is None:
                    raise ValueError("this pipeline has no VAE to encode images with")
                self.vae = self._vae_loader(True)
            try:
                out = encode_image(self.vae, images)
                mx.eval(out)
            finally:
                self._release_vae()
            return out

    # -- generate -----------------------------------------------------------------

    def resolve_options(self, opts: GenerateOptions) -> GenerateOptions:
        """A validated copy of opts with the model's defaults filled in, checked
        against this model (before any heavy work)."""
        cfg = self.config
        opts = replace(opts).validate()
        defaults = getattr(cfg, "sampling", None) or {}  # a model may record its own defaults
        if opts.guidance is None:
            opts.guidance = float(defaults.get("guidance", DEFAULT_GUIDANCE))
        opts.sampler = opts.sampler or defaults.get("sampler", "jacobi")
        if opts.sampler == "jacobi" and (not cfg.sos or not cfg.rope):
            raise ValueError("this model cannot use Jacobi sampling (it needs SOS and RoPE); use sampler='sequential'")
        if opts.denoise == "learned" and not cfg.learnable_self_denoiser:
            raise ValueError("this model has no learnable denoiser: use denoise='score' or 'none'")
        if opts.denoise == "auto":
            opts.denoise = "none" if cfg.finetuned_vae else "learned" if cfg.learnable_self_denoiser else "score"
        shape = self.latent_shape(opts.height, opts.width)
        B = len(opts.batch_prompts)
        if B > MAX_BATCH:
            raise OptionError(
                "num_images",
                f"{B} images in one call; at most {MAX_BATCH} (options.batches splits a larger request; "
                "the command line runs it batch after batch)",
            )
        if opts.latents is not None:
            lat = opts.latents if isinstance(opts.latents, mx.array) else mx.array(opts.latents)
            if tuple(lat.shape) != (B, *shape):
                raise ValueError(
                    f"latents must have shape {(B, *shape)} (batch, height, width, channels), got {tuple(lat.shape)}"
                )
            opts.latents = lat.astype(mx.float32)
            opts.seed = []
        else:
            opts.seed = expand_seeds(opts.seed, B)
        self.check_prompts(opts.prompts)
        if self.classes is not None and self.classes.one_hot and opts.guidance > 0:
            self.classes.index(opts.negative_prompt)
        elif self.classes is None and opts.guidance > 0:
            self.check_prompts([opts.negative_prompt])
        opts.height, opts.width = shape[0] * cfg.pixels_per_latent, shape[1] * cfg.pixels_per_latent
        return opts

    def generate(
        self,
        prompt: Union[str, Sequence[str], GenerateOptions],
        *,
        progress: Optional[Callable] = None,
        **options,
    ) -> Result:
        """Generate num_images images per prompt. Options are GenerateOptions' fields:
        negative_prompt, num_images, seed (one int: image i gets seed + i; one per
        image; None: random), guidance, sampler, jacobi_block_size, jacobi_threshold,
        jacobi_max_iter, denoise, height, width, latents (the initial noise
        (B, H, W, C) instead of seeds, B = prompts x num_images).

        progress(stage, done, total) is called during each stage; returning False
        cancels the call (raises Cancelled) and leaves the pipeline usable. (Several
        processes share a call through `distributed.share(pipe, group)`.)"""
        return drive(self.generate_steps(prompt, **options), progress)

    def generate_steps(
        self,
        prompt: Union[str, Sequence[str], GenerateOptions],
        *,
        after_sampling: Optional[Callable] = None,
        **options,
    ) -> Iterator[Event]:
        """Generation as a generator of Events: one per token or Jacobi chunk while
        sampling, one per other stage; the last carries the Result. Options are
        checked before the first event; stop iterating to cancel. after_sampling(x)
        -> x is applied to the final latents, after sampling and denoising (a masked
        edit pastes its kept latents back there: denoising the pasted latents would
        fill the region with noise)."""
        unknown = sorted(set(options) - set(GenerateOptions.names()))
        if unknown:
            raise TypeError(
                f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(GenerateOptions.names()[1:])}"
            )
        if "group" in options:
            raise TypeError("group: several processes share a call through distributed.share(pipe, group)")
        opts = prompt if isinstance(prompt, GenerateOptions) else GenerateOptions(prompt, **options)
        opts = self.resolve_options(opts)
        return self._run(opts, after_sampling)

    def _run(self, opts: GenerateOptions, after_sampling=None) -> Iterator[Event]:
        with self._lock:
            yield from self._stages(opts, after_sampling or (lambda x: x))

    def params(self, opts: GenerateOptions) -> dict:
        """What a Result records of resolved options (and PNG metadata carries)."""
        params = {
            "guidance": opts.guidance,
            "sampler": opts.sampler,
            "denoise": opts.denoise,
            "negative_prompt": opts.negative_prompt,
            "model": self.info.get("model"),
            "height": opts.height,
            "width": opts.width,
        }
        if opts.kv_bits:
            params["kv_bits"] = opts.kv_bits
        if opts.jacobi is not None:
            params.update(
                jacobi_block_size=opts.jacobi_block_size,
                jacobi_threshold=opts.jacobi_threshold,
                jacobi_max_iter=opts.jacobi_max_iter,
            )
        return params

    def _stages(self, opts: GenerateOptions, after_sampling) -> Iterator[Event]:
        prompts = opts.batch_prompts
        timings, peaks = {}, {}
        guided = opts.guidance > 0

        def measured(stage):  # MLX's peak of the stage that ends, then counted afresh for the next
            if stage is not None:
                peaks[stage] = max(peaks.get(stage, 0), mx.get_peak_memory())
            mx.reset_peak_memory()

        measured(None)
        yield Event("text", 0, 1)
        t0 = time.perf_counter()
        y, y_cond = self.conditioning(prompts, opts.negative_prompt, guided)
        timings["text"] = time.perf_counter() - t0
        measured("text")
        yield Event("text", 1, 1)

        x = (
            opts.latents
            if opts.latents is not None
            else self.noise(opts.seed, self.latent_shape(opts.height, opts.width))
        )
        flow = self.flow  # low memory: loaded now, after the prompts were encoded
        cfg = self.config
        top = cfg.num_blocks - 1
        shallow = [i for i, n in enumerate(cfg.layers_per_block[:-1]) if n > 0]
        start = deep_end = time.perf_counter()
        for step in sample_steps(
            flow, x, y, opts.guidance, jacobi=opts.jacobi, overlap=device.overlap(), kv_bits=opts.kv_bits
        ):
            if step.block == top:
                yield Event("deep", step.done, step.total, step)
                if step.done == step.total:
                    deep_end = time.perf_counter()
                    measured("deep")
            else:
                k = sorted(shallow, reverse=True).index(step.block)
                yield Event("shallow", k * step.total + step.done, len(shallow) * step.total, step)
        x = step.x
        del step
        mx.eval(x)
        end = time.perf_counter()
        timings["deep"] = deep_end - start
        if shallow:
            timings["shallow"] = end - deep_end
        measured("shallow" if shallow else "deep")

        if opts.denoise != "none":
            yield Event("denoise", 0, 1)
            t0 = time.perf_counter()
            if opts.denoise == "learned":
                x = flow.learned_denoise(x, y_cond)
            else:  # block by block: a call can be stopped between blocks
                x = yield from _progress("denoise", flow.denoise_steps(x, y_cond, cfg.noise_std))
            mx.eval(x)
            timings["denoise"] = time.perf_counter() - t0
            measured("denoise")
            yield Event("denoise", 1, 1)
        del flow, y, y_cond
        self._release_flow()  # low memory: the VAE is never beside the flow

        x = after_sampling(x)
        yield Event("decode", 0, x.shape[0])
        t0 = time.perf_counter()
        images = yield from _progress("decode", self.decode_steps(x))  # the last one comes with the result
        timings["decode"] = time.perf_counter() - t0
        measured("decode")

        result = Result(
            images=images,
            latents=x,
            seeds=list(opts.seed),
            prompts=list(prompts),
            timings=timings,
            peak_memory=max(peaks.values()),
            stage_peaks=peaks,
            params=self.params(opts),
        )
        yield Event("decode", x.shape[0], x.shape[0], result=result)

    # -- what only a flow can do: each in its own module, reached from here ----------

    def score(self, images, prompts, **kwargs):
        """Exact likelihood of images under prompts: see likelihood.score."""
        return likelihood.score(self, images, prompts, **kwargs)

    def invert(self, prompt, **kwargs):
        """Images or latents -> the noise that sampling maps back to them: see editing.invert."""
        return editing.invert(self, prompt, **kwargs)

    def edit(self, image, prompt, **kwargs):
        """Editing by exact inversion: see editing.edit."""
        return editing.edit(self, image, prompt, **kwargs)
