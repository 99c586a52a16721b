"""Prompt -> clip with STARFlow-V, kept loaded for apps.

    pipe = VideoPipeline.from_pretrained("apple/starflow-v")
    for event in pipe.generate_steps("a corgi looks at the camera", frames=81, fps=16, seed=7):
        if event.stage == "frame":
            event.preview()  # the frame just finished, as a PIL image
    clip = event.result  # frames (uint8), fps, prompt, seed, params

Stages: encode the prompt as the reference prepares video prompts (its fps line where
the model has `fps_cond`, the noise level where `cond_noise_level`, the aspect ratio
where `mix_aspect`), sample the flow over the clip (video_sample: the deep block causal
over frames, then the frame-local shallow blocks), denoise with the learnable
self-denoiser (chunked by the local window as the reference), then decode frame by frame
(the Wan2.2 VAE's decode_steps: the first latent frame gives one video frame, every later
one four, after undoing the VAE's temporal scale; memory stays one step's). A pixel-space
video flow (no VAE) gives its frames straight from the flow's output, in [-1, 1].

One event per finished frame (stage "frame") carries it; stop iterating to cancel.
With frame-local shallow blocks (the release's) the clip is streamed: each frame the
deep block finishes goes through the shallow blocks at once and has a "preview" event
before the deep block samples the next (with preview=True its picture before the
denoising: the flow's pixels, or the latent frame decoded by a second, streaming Wan2.2
decode).
"""

import gc
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .loading import device, precision_policy
from .loading.quant import quant_args
from .loading.text import load_text_encoder
from .loading.video import clip_shapes, load_video_flow, read_video_config
from .loading.video_resolve import VIDEO_MODEL, resolve_video
from .loading.wan_vae import load_wan_vae
from .loading.weights import DTYPES
from .models.cache import kv_group_size
from .models.flow import IdentityBlock
from .models.video import VideoFlow
from .options import (
    MAX_PROMPT_CHARS,
    SEED_LIMIT,
    Cancelled,
    GenerateOptions,
    LoadOptions,
    Options,
    check_fields,
    check_seed,
    like,
    option,
)
from .pipeline import ClassEncoder
from .sample import Jacobi, OptionError, check_guidance
from .video_sample import sample_video_steps, streams
from .videos import to_uint8

__all__ = [
    "VideoPipeline",
    "VideoOptions",
    "VideoEvent",
    "VideoResult",
    "video_prompt",
    "aspect_size",
    "random_seed",
    "Cancelled",
]

# The aspect ratios the reference's sampler offers to models trained on several (mix_aspect).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")
# The reference's text-to-video script: guidance 3.5, Jacobi blocks of 32 tokens, threshold 0.001, 16:9.
DEFAULT_VIDEO_GUIDANCE = 3.5
DEFAULT_ASPECT = "16:9"
MAX_FRAMES = 1024  # video frames of one clip (past the training length the local window bounds memory)
MAX_FPS = 120
VIDEO_DENOISE = ("auto", "learned", "score", "none")


@dataclass
class VideoOptions(Options):
    """Everything a clip can be asked, shared by the API, the command line and the server.
    `validate()` checks what needs no model; `VideoPipeline.resolve_options` fills the
    model's defaults and checks the rest against it."""

    prompt: str = option(None, "what the clip shows", metavar="P", kind=str, request=True)
    negative_prompt: str = like(GenerateOptions, "negative_prompt")
    frames: Optional[int] = option(
        None,
        "video frames (default: the model's training length, 81 for the release); with the Wan2.2 VAE "
        "1 + 4k (every latent frame after the first is 4 video frames)",
        metavar="N",
        kind=int,
        low=1,
        high=MAX_FRAMES,
        request=True,
    )
    fps: Optional[int] = option(
        None,
        "frames per second: the clip's playback rate, and part of the prompt for models conditioned on it "
        "(default: the model's, 16 for the release)",
        metavar="N",
        kind=int,
        low=1,
        high=MAX_FPS,
        request=True,
    )
    seed: Optional[int] = option(
        None,
        "the noise's seed (default: random; the clip records it)",
        metavar="N",
        kind=int,
        low=0,
        high=SEED_LIMIT - 1,
    )
    guidance: Optional[float] = like(
        GenerateOptions,
        "guidance",
        help="guidance weight, 0 for none (default: the model's own, else 3.5 as the reference video script)",
    )
    aspect_ratio: Optional[str] = option(
        None,
        "width:height of models trained on several aspect ratios (default: 16:9 for them, as the reference "
        "video script; square for the others)",
        choices=ASPECT_RATIOS,
        kind=str,
    )
    sampler: Optional[str] = like(
        GenerateOptions,
        "sampler",
        help="jacobi: chunks of tokens solved in parallel, each frame's first guess the frame before; "
        "sequential: token by token (default: the model's own, else jacobi)",
    )
    jacobi_block_size: int = like(GenerateOptions, "jacobi_block_size", default=32, help="tokens per Jacobi chunk")
    jacobi_threshold: float = like(GenerateOptions, "jacobi_threshold")
    jacobi_max_iter: int = like(GenerateOptions, "jacobi_max_iter")
    denoise: str = option(
        "auto",
        "after sampling: the model's learned self-denoiser, one step along its score, or nothing (auto: the "
        "model's own default, else learned if it has one, none with a fine-tuned VAE, else score)",
        choices=VIDEO_DENOISE,
        kind=str,
        request=True,
    )
    local_attn_window: Optional[int] = option(
        None,
        "latent frames the deep block attends to (default: the model's; for clips past the training length "
        "the training length, as the reference)",
        metavar="N",
        kind=int,
        low=1,
        high=MAX_FRAMES,
        request=True,
    )
    context_length: Optional[int] = option(
        None,
        "latent frames a full window keeps as context (default: the window less one)",
        metavar="N",
        kind=int,
        low=1,
        high=MAX_FRAMES,
        request=True,
    )
    kv_bits: Optional[int] = like(
        GenerateOptions,
        "kv_bits",
        help="hold the deep block's KV cache at this many bits (keys and values quantized in groups of 64): about "
        "half the cache of bf16, a quarter of float32 (26.5 GB in bf16 for the release's 81 frames) "
        "(default: the flow's dtype)",
    )
    preview: bool = option(
        False,
        'a picture with each "preview" event: every frame as soon as the sampler has it, before the '
        "denoising; with the Wan2.2 VAE each latent frame is decoded then too (a second decode of the clip, "
        "and a second set of the decoder's frame caches held while sampling)",
        kind=bool,
        cli=False,
    )

    def validate(self) -> "VideoOptions":
        """Raises OptionError naming the option; returns self."""
        if not isinstance(self.prompt, str):
            raise OptionError("prompt", "give a prompt (a string)")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise OptionError("prompt", f"a prompt of {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise OptionError("negative_prompt", f"negative_prompt must be a string of at most {MAX_PROMPT_CHARS}")
        if self.guidance is not None:
            self.guidance = check_guidance(self.guidance)
        check_fields(self)
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        Jacobi(self.jacobi_block_size, self.jacobi_threshold, self.jacobi_max_iter)
        if not isinstance(self.preview, bool):
            raise OptionError("preview", f"preview must be True or False, not {self.preview!r}")
        return self


@dataclass
class VideoResult:
    frames: list  # uint8 (H, W, 3) numpy arrays
    fps: int
    prompt: str
    seed: int
    latents: mx.array  # the flow's clip after denoising, before decoding (1, T', h, w, C)
    timings: dict = field(default_factory=dict)
    peak_memory: int = 0
    params: dict = field(default_factory=dict)  # every setting (what the MP4 records)

    @property
    def size(self):
        """(width, height) in pixels."""
        return self.frames[0].shape[1], self.frames[0].shape[0]


@dataclass
class VideoEvent:
    """One report of `VideoPipeline.generate_steps`: `done` of `total` of a stage ("text",
    "deep", "shallow", "preview", "denoise", "frame"). During "frame" `frame` is the frame
    just finished (uint8 (H, W, 3)) and `index` its number; the last event carries the
    result. A streamed clip (VideoPipeline.streamed) has a "preview" event for each video
    frame as soon as the sampler has it, between the deep block's tokens: `index` its
    number, `frame` its picture before the denoising when asked (preview=True), else None."""

    stage: str
    done: int
    total: int
    frame: Optional[np.ndarray] = None
    index: Optional[int] = None
    result: Optional[VideoResult] = None

    def preview(self):
        """The frame as a PIL image (None outside the "frame" stage)."""
        from PIL import Image

        return None if self.frame is None else Image.fromarray(self.frame)


def random_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2**31))


def video_prompt(prompt: str, cfg, video, fps: int, aspect_ratio: Optional[str]) -> str:
    """A prompt as the reference prepares it for a video model's T5 (utils/common.py's
    preprocessing): the fps line where the model is conditioned on it, then the noise
    level, then the aspect ratio of models trained on several."""
    text = prompt
    if video.fps_cond:
        text = f"A video with {fps} fps:\n{text}\n" if fps > 0 else f"An image:\n{text}\n"
    if video.cond_noise_level:
        text = f"Noise Level {int(cfg.noise_std * 1000)}:\n{text}"
    if aspect_ratio is not None:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text


def aspect_size(side: int, aspect_ratio: Optional[str], multiple: int):
    """(height, width) of a clip: the area of side x side at the aspect ratio, each rounded
    to the nearest multiple (the reference's aspect_ratio_to_image_size)."""
    if aspect_ratio is None:
        return side, side
    rw, rh = (int(v) for v in aspect_ratio.split(":"))
    r = rw / rh
    h = int(round(math.sqrt(side * side / r) / multiple)) * multiple
    w = int(round(math.sqrt(side * side * r) / multiple)) * multiple
    return h, w


class VideoPipeline:
    """A video flow with its text encoder (or classes) and, for latent models, the Wan2.2 VAE."""

    def __init__(
        self,
        flow: VideoFlow,
        text_loader: Optional[Callable] = None,
        vae=None,
        info=None,
        keep_text_encoder: bool = False,
    ):
        self.flow = flow
        self.config, self.video = flow.config, flow.video
        self.vae = vae
        self.info = info or {}
        self.keep_text_encoder = keep_text_encoder
        self.classes = ClassEncoder.for_config(self.config)
        self._text_loader = text_loader
        self._text = None
        self._lock = threading.RLock()
        if self.config.vae and vae is None:
            raise ValueError("this video model works in a VAE's latent space: give its Wan2.2 VAE")
        if vae is not None:
            vc = vae.config
            if vc.z_dim != self.config.in_channels:
                raise ValueError(f"the VAE has {vc.z_dim} latent channels, the model {self.config.in_channels}")
            if vc.spatial_factor != self.config.pixels_per_latent:
                raise ValueError(
                    f"the VAE downsamples by {vc.spatial_factor}, the model expects {self.config.pixels_per_latent}"
                )

    @classmethod
    def from_pretrained(
        cls,
        model: str = VIDEO_MODEL,
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
    ) -> "VideoPipeline":
        """Load a video model by name: a converted folder, a reference .pth (converted once
        into the cache) or a folder holding one, or `apple/starflow-v` (the release). The
        flow's weights in `dtype` (None: as stored; "auto": the precision policy for video,
        precision_policy.choose_video: the device and its memory choose the flow's and the
        text encoder's precision for the model's own clip, `info["precision"]` says which
        and why), optionally quantized to `quantize` bits as image flows are; text_dtype
        "auto" follows the flow's. The text encoder is loaded when needed and freed after
        encoding unless keep_text_encoder."""
        load = LoadOptions(
            model=model,
            dtype=dtype,
            quantize=quantize,
            q_group_size=q_group_size,
            text_dtype=text_dtype,
            text_quantize=text_quantize,
            vae_dtype=vae_dtype,
        )
        load.validate()  # one OptionError naming the option
        where = resolve_video(model, checkpoint=checkpoint, config=config, text_encoder=text_encoder, vae=vae)
        cfg, _ = read_video_config(where.flow)
        choice = None
        if dtype == "auto" or text_dtype == "auto":
            side = cfg.image_size or cfg.input_size * cfg.pixels_per_latent
            size = aspect_size(side, DEFAULT_ASPECT if cfg.mix_aspect else None, cfg.pixels_per_latent * cfg.patch_size)
            shapes = clip_shapes(where.flow, where.text_encoder, where.vae, size)
            choice = precision_policy.choose_video(
                shapes, dtype=dtype, quantize=quantize, text_dtype=text_dtype, text_quantize=text_quantize
            )
            dtype, quantize = choice.dtype, choice.quantize
            text_dtype, text_quantize = choice.text_dtype, choice.text_quantize
        q, tq = (quant_args({"bits": b, "group_size": q_group_size} if b else None) for b in (quantize, text_quantize))
        flow = device.prepare(load_video_flow(where.flow, dtype=dtype, quantize=q))
        loader = None
        if where.text_encoder is not None:
            txt_size, td = flow.config.txt_size, DTYPES[text_dtype]

            def loader():
                return load_text_encoder(where.text_encoder, txt_size=txt_size, dtype=td, quantize=tq)

        # device.prepare: on a CPU the decoder's convolutions run in strips of rows (bounded memory)
        wan = device.prepare(load_wan_vae(where.vae, dtype=DTYPES[vae_dtype])) if where.vae is not None else None
        info = {
            "model": str(model),
            "flow": str(where.flow),
            "text_encoder": where.text_encoder,
            "vae": where.vae,
            "dtype": dtype,
            "quantize": quantize,
            "text_dtype": text_dtype,
            "text_quantize": text_quantize,
        }
        if choice is not None:
            info["precision"], info["precision_peak"] = choice.line, choice.peak
        return cls(flow, loader, wan, info, keep_text_encoder)

    # -- sizes and defaults ------------------------------------------------------------------

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.temporal_factor if self.vae is not None else 1

    def side(self) -> int:
        cfg = self.config
        return cfg.image_size or cfg.input_size * cfg.pixels_per_latent

    def sizes(self) -> dict:
        """{aspect ratio or None: (height, width)} this model makes."""
        cfg = self.config
        multiple = cfg.pixels_per_latent * cfg.patch_size
        if not cfg.mix_aspect:
            return {None: (self.side(), self.side())}
        return {a: aspect_size(self.side(), a, multiple) for a in ASPECT_RATIOS}

    def latent_frames(self, frames: int) -> int:
        f = self.temporal_factor
        if (frames - 1) % f:
            lo = (frames - 1) // f * f + 1
            raise OptionError(
                "frames",
                f"frames must be 1 + {f}k for this model's VAE (each latent frame after the first is {f} frames), "
                f"not {frames}: try {lo} or {lo + f}",
            )
        return (frames - 1) // f + 1

    def resolve_options(self, opts: VideoOptions) -> VideoOptions:
        """A validated copy of opts with the model's defaults filled in, checked against
        this model (before any heavy work)."""
        cfg, video = self.config, self.video
        opts = replace(opts).validate()
        defaults = getattr(cfg, "sampling", None) or {}
        if opts.guidance is None:
            opts.guidance = float(defaults.get("guidance", DEFAULT_VIDEO_GUIDANCE))
        opts.sampler = opts.sampler or defaults.get("sampler", "jacobi")
        if opts.frames is None:
            if not video.frames:
                raise OptionError("frames", "this model does not record its clips' length: give frames")
            opts.frames = video.frames
        if opts.fps is None:
            opts.fps = video.fps
        T = self.latent_frames(opts.frames)
        if cfg.mix_aspect:
            opts.aspect_ratio = opts.aspect_ratio or DEFAULT_ASPECT
        elif opts.aspect_ratio not in (None, "1:1"):
            raise OptionError(
                "aspect_ratio",
                f"this model makes square clips only ({self.side()} pixels a side), not {opts.aspect_ratio}",
            )
        else:
            opts.aspect_ratio = None
        if opts.denoise == "auto":
            learned = "learned" if cfg.learnable_self_denoiser else "score"
            opts.denoise = defaults.get("denoise", "none" if cfg.finetuned_vae else learned)
        if opts.denoise == "learned" and not cfg.learnable_self_denoiser:
            raise OptionError("denoise", "this model has no learnable self-denoiser: use denoise='none'")
        trained = (video.frames - 1) // self.temporal_factor + 1 if video.frames else None
        window = opts.local_attn_window or video.local_attn_window
        if window is None and trained is not None and T > trained:
            window = trained  # past the training length: the reference's target_length
        if window is not None and window >= T:
            window = None if video.local_attn_window is None and opts.local_attn_window is None else window
        if window is not None:
            if opts.sampler != "jacobi":
                raise OptionError(
                    "sampler",
                    "with a local attention window (or past the training length) "
                    "a clip is sampled by Jacobi only, as the reference: use sampler='jacobi'",
                )
            if opts.context_length is not None and opts.context_length >= window:
                raise OptionError("context_length", f"context_length must be below the window ({window} latent frames)")
        elif opts.context_length is not None:
            raise OptionError("context_length", "context_length is for a local attention window (local_attn_window)")
        opts.local_attn_window = window
        if opts.sampler == "jacobi" and (not cfg.sos or not cfg.rope):
            raise OptionError("sampler", "this model cannot use Jacobi sampling (it needs SOS and RoPE)")
        if self.classes is not None:
            self.classes.index(opts.prompt)
            if opts.guidance > 0:
                self.classes.index(opts.negative_prompt)
        if opts.kv_bits:
            try:
                kv_group_size(cfg.top_head_size)
            except ValueError as e:
                raise OptionError("kv_bits", str(e)) from None
        if opts.seed is None:
            opts.seed = random_seed()
        return opts

    def params(self, opts: VideoOptions) -> dict:
        """Every setting of a resolved call (what the MP4 records and --from-video replays)."""
        h, w = self.sizes()[opts.aspect_ratio]
        p = {
            "negative_prompt": opts.negative_prompt,
            "frames": opts.frames,
            "fps": opts.fps,
            "guidance": opts.guidance,
            "sampler": opts.sampler,
            "denoise": opts.denoise,
            "width": w,
            "height": h,
            "model": self.info.get("model"),
        }
        if opts.aspect_ratio is not None:
            p["aspect_ratio"] = opts.aspect_ratio
        if opts.jacobi is not None:
            p.update(
                jacobi_block_size=opts.jacobi_block_size,
                jacobi_threshold=opts.jacobi_threshold,
                jacobi_max_iter=opts.jacobi_max_iter,
            )
        if opts.kv_bits:
            p["kv_bits"] = opts.kv_bits
        if opts.local_attn_window is not None:
            p["local_attn_window"] = opts.local_attn_window
            if opts.context_length is not None:
                p["context_length"] = opts.context_length
        return p

    # -- the stages -------------------------------------------------------------------------

    def _encoder(self):
        if self.classes is not None:
            return self.classes
        if self._text is None:
            if self._text_loader is None:
                raise ValueError("this model has no text encoder")
            self._text = self._text_loader()
        return self._text

    def _release_text(self):
        if self._text is not None and not self.keep_text_encoder:
            self._text.release()
            self._text = None

    def conditioning(self, opts: VideoOptions):
        """(y for sampling: [cond; uncond] when guided, y_cond)."""
        prompts = [opts.prompt] + ([opts.negative_prompt] if opts.guidance > 0 else [])
        if self.classes is None:
            prompts = [video_prompt(p, self.config, self.video, opts.fps, opts.aspect_ratio) for p in prompts]
        try:
            y = self._encoder().encode(prompts)
            mx.eval(y)
        finally:
            self._release_text()
        return y, y[:1]

    def noise(self, opts: VideoOptions) -> mx.array:
        cfg = self.config
        h, w = self.sizes()[opts.aspect_ratio]
        f = cfg.pixels_per_latent
        shape = (1, self.latent_frames(opts.frames), h // f, w // f, cfg.in_channels)
        return mx.random.normal(shape, key=mx.random.key(int(opts.seed)))

    def denoise(self, x, y_cond, window: Optional[int]):
        """The learned self-denoiser over the clip; with a local window, in chunks of the
        window that overlap by the denoiser's window (the reference's process_denoising)."""
        if window is None or window >= x.shape[1]:
            return self.flow.learned_denoise(x, y_cond)
        T, s, overlap = x.shape[1], 0, 0
        step_overlap = window - 1 if self.video.denoiser_window is None else min(self.video.denoiser_window, window - 1)
        while s < T:
            out = self.flow.learned_denoise(x[:, s : s + window], y_cond)
            x[:, s + overlap : s + window] = out[:, overlap:]
            mx.eval(x)
            overlap = step_overlap
            s += window - overlap
        return x

    def score_denoise(self, x, y_cond):
        """One step along the score: x + noise_std^2 * grad log p(x | y), the conditional prompt only."""
        s = self.config.noise_std
        grad = mx.grad(lambda v: self.flow.log_prob(v, y_cond).sum())(x.astype(mx.float32))
        return x + s * s * grad

    def streamed(self, opts: VideoOptions) -> bool:
        """Whether a call's frames come out while it samples ("preview" events): frame-local
        shallow blocks, and sequential sampling or previews asked for (with Jacobi the
        previews take a pass of the shallow blocks of their own: video_sample)."""
        return streams(self.flow) and (opts.jacobi is None or opts.preview)

    def _previews(self, step, opts: VideoOptions, decoder) -> Iterator[VideoEvent]:
        """The "preview" events of a latent frame the sampler has finished: its video frames
        (1 for the first, temporal_factor after), decoded when previews are asked for."""
        t, f = step.frame, self.temporal_factor
        first, count = (0, 1) if t == 0 else (1 + (t - 1) * f, f)
        pictures = [None] * count
        if opts.preview and self.vae is None:
            pictures = [to_uint8(np.array(mx.clip(step.frame_x[0, 0], -1.0, 1.0)))]
        elif opts.preview:
            z = step.frame_x if t == 0 else step.frame_x / self.video.temporal_scale
            out = np.array(mx.clip(decoder(z).astype(mx.float32), -1.0, 1.0))
            pictures = [to_uint8(v) for v in out[0]]
        for j, picture in enumerate(pictures):
            yield VideoEvent("preview", first + j + 1, opts.frames, picture, first + j)

    def frames_of(self, x) -> Iterator[np.ndarray]:
        """The clip's video frames, uint8, one after another: decoded one latent frame at a
        time with the Wan2.2 VAE (its temporal scale undone first), or the flow's own frames."""
        if self.vae is None:
            for t in range(x.shape[1]):
                f = mx.clip(x[0, t], -1.0, 1.0)
                mx.eval(f)
                yield to_uint8(np.array(f))
            return
        scale = self.video.temporal_scale
        z = x if scale == 1 else mx.concatenate([x[:, :1], x[:, 1:] / scale], axis=1)
        for chunk in self.vae.decode_steps(z, 1):
            chunk = np.array(mx.clip(chunk.astype(mx.float32), -1.0, 1.0))
            for f in chunk[0]:
                yield to_uint8(f)

    # -- generate ---------------------------------------------------------------------------

    def generate(self, prompt, *, progress: Optional[Callable] = None, **options) -> VideoResult:
        """Run generate_steps to its result; progress(stage, done, total) returning False cancels (Cancelled)."""
        events = self.generate_steps(prompt, **options)
        for event in events:
            if progress is not None and progress(event.stage, event.done, event.total) is False:
                events.close()
                raise Cancelled(event.stage)
        return event.result

    def generate_steps(self, prompt, **options) -> Iterator[VideoEvent]:
        """A clip as a generator of VideoEvents: sampling progress, then one "frame" event per
        finished frame (its preview), the last carrying the VideoResult. Options (VideoOptions'
        fields) are checked before the first event; stop iterating to cancel."""
        unknown = sorted(set(options) - set(VideoOptions.names()))
        if unknown:
            raise TypeError(f"unknown video option(s) {', '.join(unknown)}; known: {', '.join(VideoOptions.names())}")
        opts = prompt if isinstance(prompt, VideoOptions) else VideoOptions(prompt, **options)
        opts = self.resolve_options(opts)
        return self._run(opts)

    def _run(self, opts: VideoOptions) -> Iterator[VideoEvent]:
        with self._lock:
            yield from self._stages(opts)

    def _stages(self, opts: VideoOptions) -> Iterator[VideoEvent]:
        timings = {}
        mx.reset_peak_memory()
        yield VideoEvent("text", 0, 1)
        t0 = time.perf_counter()
        y, y_cond = self.conditioning(opts)
        timings["text"] = time.perf_counter() - t0
        yield VideoEvent("text", 1, 1)

        t0 = time.perf_counter()
        noise = self.noise(opts)
        top = len(self.flow.blocks) - 1
        shallow = [i for i in range(top - 1, -1, -1) if not isinstance(self.flow.blocks[i], IdentityBlock)]
        window = opts.local_attn_window
        context = None if window is None else (opts.context_length or window - 1)
        stream = self.streamed(opts)
        decoder = self.vae.stream_decoder() if stream and opts.preview and self.vae is not None else None
        # The shallow blocks' progress: each block's share done (Jacobi's previews: a pass of their own).
        passes = 2 if stream and opts.jacobi is not None else 1
        p = self.config.patch_size
        clip_tokens = noise.shape[1] * (noise.shape[2] // p) * (noise.shape[3] // p)
        shares = {}
        x = None
        steps = sample_video_steps(
            self.flow,
            noise,
            y,
            opts.guidance,
            jacobi=opts.jacobi,
            context_length=context,
            local_attn_window=window,
            stream=stream,
            kv_bits=opts.kv_bits,
        )
        for step in steps:
            if step.frame is not None:
                yield from self._previews(step, opts, decoder)
            elif step.block == top:
                yield VideoEvent("deep", step.done, step.total)
            else:
                shares[step.block, step.preview] = step.done / step.total
                total = max(len(shallow), 1) * passes * clip_tokens
                yield VideoEvent("shallow", round(sum(shares.values()) * clip_tokens), total)
            if step.x is not None:
                x = step.x
        del decoder
        mx.eval(x)
        timings["sample"] = time.perf_counter() - t0

        if opts.denoise != "none":
            yield VideoEvent("denoise", 0, 1)
            t0 = time.perf_counter()
            x = self.denoise(x, y_cond, window) if opts.denoise == "learned" else self.score_denoise(x, y_cond)
            mx.eval(x)
            timings["denoise"] = time.perf_counter() - t0
            yield VideoEvent("denoise", 1, 1)
        del y, y_cond
        gc.collect()

        t0 = time.perf_counter()
        frames = []
        total = opts.frames
        for i, frame in enumerate(self.frames_of(x)):
            frames.append(frame)
            if len(frames) == total:
                timings["decode"] = time.perf_counter() - t0
                result = VideoResult(
                    frames=frames,
                    fps=opts.fps,
                    prompt=opts.prompt,
                    seed=opts.seed,
                    latents=x,
                    timings=timings,
                    peak_memory=mx.get_peak_memory(),
                    params=self.params(opts),
                )
                yield VideoEvent("frame", i + 1, total, frame, i, result)
                return
            yield VideoEvent("frame", i + 1, total, frame, i)
