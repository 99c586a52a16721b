"""Every option of the engine, defined once.

`GenerateOptions` (what a generation call is asked) and `LoadOptions` (how a model is
loaded) are dataclasses whose fields carry their help, limits and the names the front
ends use (`meta`): the command lines derive their flags from them (cli/common.py), the
server its request parameters and its table (cli/server.py), the benchmark and the
distributed loader their loading arguments. A new option is one field here.

Also the shapes a call returns (`Result`, `Event`, `Cancelled`) and `drive`, which runs a
generator of events to its result; the pipeline, score and edit share them.
"""

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .sample import Jacobi, OptionError, Step, check_guidance, is_whole

SAMPLERS = ("jacobi", "sequential")
DENOISE = ("auto", "score", "learned", "none")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The reference image scripts' sampling settings.
DEFAULT_GUIDANCE = 3.6
DEFAULT_JACOBI = Jacobi(block_size=16, threshold=1e-3, max_iter=32)

# Upper limits of the options that set work: the same in the API, the CLI and the server.
MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 32000
MAX_IMAGES = 1000  # per prompt; the command line runs them in batches (MAX_BATCH)
MAX_BATCH = 64  # images one call holds at once
MAX_GUIDANCE = 100.0
MAX_SIDE = 4096  # pixels
SEED_LIMIT = 2**64  # mx.random.key takes an unsigned 64-bit seed


def meta(
    help: str,
    *,
    flag: Optional[str] = None,
    aliases: Sequence[str] = (),
    metavar: Optional[str] = None,
    choices: Optional[Sequence] = None,
    low=None,
    high=None,
    kind: Optional[type] = None,
    nargs: Optional[str] = None,
    request: Union[None, bool, str] = None,
    cli: bool = True,
    place: bool = False,
) -> dict:
    """A field's description for the front ends. flag: the CLI flag (default --field-name);
    aliases: more flags for it (the issue's or a neighbour's name, e.g. --precision);
    request: the server's parameter name (True: the field's name; None: not a parameter);
    low/high: the inclusive limits; kind: the value's type; place: a path or a name to fetch
    (never taken from an image's metadata)."""
    return dict(
        help=help,
        flag=flag,
        aliases=tuple(aliases),
        metavar=metavar,
        choices=tuple(choices) if choices else None,
        low=low,
        high=high,
        kind=kind,
        nargs=nargs,
        request=request,
        cli=cli,
        place=place,
    )


def option(default, help: str, **kwargs):
    return field(default=default, metadata=meta(help, **kwargs))


def like(cls, name: str, **changes):
    """A field as `cls`'s field `name` is (its flag, kind, limits, request name: one definition),
    with `changes` for another dataclass: default=, help=, ..."""
    f = {f.name: f for f in fields(cls)}[name]
    default = changes.pop("default", f.default)
    return field(default=default, metadata={**f.metadata, **changes})


def check_fields(options, skip=("seed",)):
    """Every described field of an options dataclass within its choices and limits (in place),
    or an OptionError naming it."""
    for name, _, m in specs(type(options)):
        value = getattr(options, name)
        if m["choices"] and value is not None and value not in m["choices"]:
            shown = ", ".join(str(c) for c in m["choices"])
            raise OptionError(name, f"{name} must be one of {shown}, not {value!r}")
        if m["low"] is not None and name not in skip:
            setattr(options, name, check_range(name, value, m))


def specs(cls) -> List[tuple]:
    """(field name, default, meta) of a dataclass's described fields, in order."""
    out = []
    for f in fields(cls):
        if f.metadata:
            default = f.default if f.default is not MISSING else None
            out.append((f.name, default, dict(f.metadata)))
    return out


def check_range(name: str, value, m: dict):
    """A whole or real number within the field's limits, or an OptionError naming the field."""
    if value is None:
        return None
    kind = m.get("kind")
    if kind is int:
        ok = is_whole(value) or (isinstance(value, np.integer))
    else:
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        ok = ok and math.isfinite(float(value))
    low, high = m.get("low"), m.get("high")
    what = "a whole number" if kind is int else "a finite number"
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise OptionError(name, f"{name} must be {what} {bounds}, not {value!r}")
    return int(value) if kind is int else float(value)


class Cancelled(Exception):
    """A call stopped by its progress callback (the pipeline stays usable)."""


@dataclass
class Result:
    images: list  # PIL images, prompt-major: all images of prompt 0, then prompt 1, ...
    latents: mx.array  # the flow's final samples (B, H, W, C), after denoising, before decoding
    seeds: List[int]
    prompts: List[str]
    timings: dict = field(default_factory=dict)  # seconds per stage
    peak_memory: int = 0  # bytes, MLX's peak during this call
    stage_peaks: dict = field(default_factory=dict)  # bytes, MLX's peak during each stage (reset at its start)
    params: dict = field(default_factory=dict)  # everything needed to reproduce it


@dataclass
class Event:
    """One report of `Pipeline.generate_steps`: `done` of `total` of a stage
    ("text", "deep", "shallow", "denoise", "decode"). `step` is the sampler's Step
    during "deep" and "shallow" (step.preview() shows the current sample); `result`
    is set on the last event only."""

    stage: str
    done: int
    total: int
    step: Optional[Step] = None
    result: Optional[Result] = None


def drive(events: Iterator[Event], progress: Optional[Callable] = None) -> Result:
    """Run a generator of Events to its Result, calling progress(stage, done, total)
    on each; progress returning False stops the generator and raises Cancelled."""
    for event in events:
        if progress is not None and event.result is None and progress(event.stage, event.done, event.total) is False:
            events.close()
            raise Cancelled(event.stage)
    if progress is not None:
        progress(event.stage, event.done, event.total)
    return event.result


def check_seed(seed, count: int = 1) -> int:
    """One seed as an int in the range every image's seed (seed + i) stays in, or an OptionError."""
    top = SEED_LIMIT - max(count, 1)
    if not (is_whole(seed) or isinstance(seed, np.integer)) or not 0 <= int(seed) < top:
        raise OptionError("seed", f"a seed must be a whole number from 0 to {top - 1}, not {seed!r}")
    return int(seed)


def expand_seeds(seed, count: int) -> List[int]:
    """One seed per image: None draws a random base, one int n gives n, n+1, ..., or
    a list with one seed per image (a single-element list counts as one int)."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    if not isinstance(seed, (int, np.integer)):
        if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__"):
            raise OptionError("seed", f"seed must be a whole number or a list of them, not {seed!r}")
        seeds = list(seed)
        if len(seeds) == 1 and count > 1:
            seed = seeds[0]
        elif len(seeds) != count:
            raise OptionError("seed", f"{len(seeds)} seeds for {count} images: give one seed, or one per image")
        else:
            return [check_seed(s) for s in seeds]
    base = check_seed(seed, count)
    return [base + i for i in range(count)]


def check_prompts(prompt) -> List[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts:
        raise ValueError("give at least one prompt (a string or a non-empty list of strings)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__}")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts; at most {MAX_PROMPTS} in one call")
    long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ValueError(f"a prompt of {len(long[0])} characters; at most {MAX_PROMPT_CHARS}")
    return prompts


class Options:
    """What the options dataclasses share: their field names, and the Jacobi sampler that
    their sampler settings name (None unless the sampler is Jacobi)."""

    @classmethod
    def names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @property
    def jacobi(self) -> Optional[Jacobi]:
        if getattr(self, "sampler", None) != "jacobi":
            return None
        return Jacobi(self.jacobi_block_size, self.jacobi_threshold, self.jacobi_max_iter)


@dataclass
class GenerateOptions(Options):
    """Everything a generation call can be asked, shared by the API, the command line and
    the server. `validate()` checks what needs no model; `Pipeline.resolve_options` fills
    the model's own defaults (guidance, sampler) and checks the rest against it."""

    prompts: Union[str, Sequence[str]] = option(
        None, "one or more prompts", flag="--prompt", metavar="P", nargs="+", request="prompt"
    )
    negative_prompt: str = option(
        "", "the prompt guidance steers away from (default: empty)", metavar="P", kind=str, request=True
    )
    num_images: int = option(1, "images per prompt", metavar="N", kind=int, low=1, high=MAX_IMAGES, request="n")
    seed: Union[None, int, Sequence[int]] = option(
        None,
        "one seed (image i gets seed + i), or one per image (default: random; each PNG records its seed)",
        metavar="N",
        kind=int,
        nargs="+",
        low=0,
        high=SEED_LIMIT - 1,
        request=True,
    )
    guidance: Optional[float] = option(
        None,
        "guidance weight, 0 for none (default: the model's own, else 3.6 as the reference image script)",
        flag="--cfg",
        metavar="W",
        kind=float,
        low=0.0,
        high=MAX_GUIDANCE,
        request=True,
    )
    sampler: Optional[str] = option(
        None,
        "jacobi: blocks of tokens solved in parallel by Jacobi iteration; sequential: token by token "
        "(default: the model's own, else jacobi)",
        choices=SAMPLERS,
        kind=str,
        request=True,
    )
    jacobi_block_size: int = option(
        16, "tokens per Jacobi block", metavar="N", kind=int, low=1, high=4096, request=True
    )
    jacobi_threshold: float = option(
        1e-3,
        "a block is done when an iteration changes it by less than this (relative mean square)",
        metavar="T",
        kind=float,
        low=0.0,
        high=1.0,
        request=True,
    )
    jacobi_max_iter: int = option(
        32, "most Jacobi iterations per block", metavar="N", kind=int, low=1, high=1000, request=True
    )
    kv_bits: Optional[int] = option(
        None,
        "hold the deep block's KV cache at this many bits (keys and values quantized in groups of 64, as "
        "mlx-lm's quantized cache): about half the cache's memory of bf16 (a quarter of float32) for a "
        "change of the sample below the flow's own precision (BENCHMARKS.md) (default: the flow's dtype)",
        choices=(8,),
        kind=int,
        request=True,
    )
    denoise: str = option(
        "auto",
        "after sampling: the model's learned denoiser, one step along its score, or nothing; "
        "auto: learned if the model has one, none with a fine-tuned VAE, else score",
        choices=DENOISE,
        kind=str,
        request=True,
    )
    height: Optional[int] = option(
        None,
        "image height in pixels (default: the model's size, 256 for the release); other sizes only for "
        "models trained on several aspect ratios",
        metavar="PX",
        kind=int,
        low=1,
        high=MAX_SIDE,
    )
    width: Optional[int] = option(
        None, "image width in pixels (default: the model's size)", metavar="PX", kind=int, low=1, high=MAX_SIDE
    )
    latents: Optional[object] = None  # the initial noise (B, H, W, C) instead of seeds (API only)

    def validate(self) -> "GenerateOptions":
        """Raises OptionError naming the option; returns self."""
        try:
            self.prompts = check_prompts(self.prompts)
        except ValueError as e:
            raise OptionError("prompts", str(e)) from None
        if not isinstance(self.negative_prompt, str) or len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise OptionError("negative_prompt", f"negative_prompt must be a string of at most {MAX_PROMPT_CHARS}")
        if self.guidance is not None:
            self.guidance = check_guidance(self.guidance)
        for name, _, m in specs(type(self)):
            value = getattr(self, name)
            if m["choices"] and value is not None and value not in m["choices"]:
                shown = ", ".join(str(c) for c in m["choices"])
                raise OptionError(name, f"{name} must be one of {shown}, not {value!r}")
            if m["low"] is not None and name != "seed":
                setattr(self, name, check_range(name, value, m))
        if self.seed is not None:
            expand_seeds(self.seed, len(self.prompts) * self.num_images)
        Jacobi(self.jacobi_block_size, self.jacobi_threshold, self.jacobi_max_iter)
        return self

    @property
    def batch_prompts(self) -> List[str]:
        return [p for p in self.prompts for _ in range(self.num_images)]


@dataclass
class LoadOptions(Options):
    """How a model is loaded: `Pipeline.from_pretrained`'s arguments, generate's loading flags,
    the server's, the benchmark's and the distributed loader's. PNG metadata records the ones
    given (`recorded`), so --from-image loads the same way."""

    model: Optional[str] = option(
        None,
        "'demo' (the bundled toy model), a converted MLX folder, a .pth checkpoint or a folder holding one, "
        "or a Hugging Face repo id (default: apple/starflow)",
        metavar="NAME",
        kind=str,
        place=True,
        cli=False,
    )
    checkpoint: Optional[str] = option(
        None,
        "checkpoint file name inside --model (default: the release's in a repo, the only .pth in a folder)",
        metavar="FILE",
        kind=str,
        place=True,
    )
    config: Optional[str] = option(
        None,
        "the checkpoint's reference YAML config (default: the .yaml beside it, or the one the package carries "
        "for the released checkpoint)",
        metavar="YAML",
        kind=str,
        place=True,
    )
    text_encoder: Optional[str] = option(
        None,
        "text encoder folder or repo id (default: the model folder's text_encoder/, else the one the model "
        "names: google/flan-t5-xl for the release)",
        metavar="NAME",
        kind=str,
        place=True,
    )
    vae: Optional[str] = option(
        None,
        "VAE folder or repo id (default: the model folder's vae/, else the one the model names: "
        "stabilityai/sd-vae-ft-ema for the release)",
        metavar="NAME",
        kind=str,
        place=True,
    )
    dtype: Optional[str] = option(
        "auto",
        "flow weights precision; auto: the precision policy (loading/precision_policy.py) picks the flow's and "
        "the text encoder's precision and quantization from the device and its free memory: on a GPU bfloat16 "
        "or lower (float32 models up to 1B parameters as stored), on a CPU float32 when the command's peak fits",
        choices=("auto",) + DTYPE_NAMES,
        aliases=("--precision",),
        kind=str,
    )
    quantize: Optional[int] = option(
        None,
        "quantize the flow's linear layers to this many bits (default: as stored)",
        choices=(4, 8),
        kind=int,
    )
    q_group_size: int = option(64, "quantization group size", choices=(32, 64, 128), kind=int)
    text_dtype: str = option(
        "auto",
        "text encoder precision (T5 overflows in float16); auto: follows the flow's (float32 with a float32 "
        "flow, bfloat16 with a bfloat16 one, 8-bit with a quantized one), unless --text-quantize is given",
        choices=("auto", "float32", "bfloat16"),
        kind=str,
    )
    text_quantize: Optional[int] = option(
        None,
        "quantize the text encoder to this many bits (default: as --text-dtype auto says, else not quantized)",
        choices=(4, 8),
        kind=int,
    )
    vae_dtype: str = option("float32", "VAE precision", choices=("float32", "bfloat16"), kind=str)
    vae_tile: Optional[int] = option(
        None,
        "decode in tiles of this many latents, for less memory (default: whole)",
        metavar="N",
        kind=int,
        low=2,
        high=4096,
    )
    keep_text_encoder: bool = option(
        False, "keep the text encoder loaded between calls (default: loaded per call, freed after encoding)", cli=False
    )
    low_memory: bool = option(
        False,
        "text encoder and VAE loaded per call and freed, the flow loaded after the prompts are encoded (and "
        "freed before decoding): lowest peak (that of the largest stage), slower calls; the one-shot commands "
        "(generate, edit, score) always run this way",
        kind=bool,
    )

    def validate(self) -> "LoadOptions":
        check_fields(self, skip=())
        return self

    def recorded(self) -> dict:
        """The loading options given (not the model: metadata replays settings, not places)."""
        given = {name: getattr(self, name) for name, _, m in specs(LoadOptions) if m["cli"] and m["kind"] is not bool}
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class Batch:
    """One call's share of a larger request: its options and the indices of its images in the
    whole request (prompt-major)."""

    options: GenerateOptions
    indices: List[int]


def batches(opts: GenerateOptions, seeds: Sequence[int], size: int = MAX_BATCH) -> List[Batch]:
    """A request of any number of images as calls of at most `size` images each, every image
    with its own prompt and seed (so the images are those of one call, for the sequential
    sampler exactly; Jacobi decides convergence per call)."""
    prompts = opts.batch_prompts
    out = []
    for start in range(0, len(prompts), size):
        idx = list(range(start, min(start + size, len(prompts))))
        part = [prompts[i] for i in idx]
        out.append(
            Batch(
                GenerateOptions(
                    **{
                        **{f.name: getattr(opts, f.name) for f in fields(opts)},
                        "prompts": part,
                        "num_images": 1,
                        "seed": [seeds[i] for i in idx],
                    }
                ),
                idx,
            )
        )
    return out
