"""python -m mlx_starflow.generate --prompt "a cat playing piano"

Writes PNG files that carry their generation parameters in PNG text chunks
(read them back with `read_metadata`; `--from-image` makes the same image again).
Existing files are never overwritten unless --overwrite is given, and files are
written whole or not at all.
"""

import argparse
import json
import math
import os
import secrets
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from . import quant
from .hub import DEFAULT_CHECKPOINT, DEFAULT_MODEL, ModelNotFound

ENGINE = "mlx-starflow"
STAGES = {
    "encode": "Encoding image",
    "invert": "Inverting",
    "text": "Encoding prompt",
    "deep": "Deep block",
    "shallow": "Shallow blocks",
    "denoise": "Denoising",
    "decode": "Decoding",
}


def engine_version() -> str:
    try:
        return f"{ENGINE} {metadata.version('mlx-starflow')}"
    except metadata.PackageNotFoundError:
        return f"{ENGINE} (source)"


MODEL_DEFAULTS = (
    "A model folder may carry its own defaults, used where an option is not given: its sampling "
    'settings ("sampling" in its config.json) and its image size. The demo samples with guidance '
    "1.0, sequentially, at 32x32."
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, except where there is no value to show: those help
    texts say what decides it."""

    def _get_help_string(self, action):
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("mlx-starflow-") else "python -m mlx_starflow.generate"


def parser():
    p = argparse.ArgumentParser(
        prog=_prog(),
        formatter_class=HelpFormatter,
        epilog=MODEL_DEFAULTS,
        description="Generate images with STARFlow on MLX.",
    )
    p.add_argument(
        "--prompt",
        metavar="P",
        nargs="+",
        default=None,
        help="one or more prompts (required unless --prompt-file or --from-image gives them)",
    )
    p.add_argument(
        "--prompt-file",
        metavar="FILE",
        default=None,
        help="prompts from a text file, one a line (blank lines skipped), after any --prompt",
    )
    p.add_argument(
        "--negative-prompt", metavar="P", default="", help="the prompt guidance steers away from (default: empty)"
    )
    p.add_argument(
        "--from-image",
        metavar="PNG",
        default=None,
        help="make an image again: every parameter from the metadata of a PNG this command wrote; "
        "options given here override it",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        default=DEFAULT_MODEL,
        help="'demo' (the bundled toy model), a converted MLX folder, a .pth checkpoint or a folder "
        "holding one, or a Hugging Face repo id",
    )
    p.add_argument(
        "--checkpoint",
        metavar="FILE",
        default=None,
        help=f"checkpoint file name inside --model (default: {DEFAULT_CHECKPOINT} in a repo, "
        "the only .pth in a folder)",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        default=None,
        help="the checkpoint's reference YAML config (default: the .yaml beside it, or the one the "
        "package carries for the released checkpoint)",
    )
    p.add_argument(
        "--text-encoder",
        metavar="NAME",
        default=None,
        help="text encoder folder or repo id (default: the model folder's text_encoder/, else the "
        "one the model names: google/flan-t5-xl for the release)",
    )
    p.add_argument(
        "--vae",
        metavar="NAME",
        default=None,
        help="VAE folder or repo id (default: the model folder's vae/, else the one the model names: "
        "stabilityai/sd-vae-ft-ema for the release)",
    )
    p.add_argument(
        "--seed",
        metavar="N",
        type=int,
        nargs="+",
        default=None,
        help="one seed (image i gets seed + i), or one per image (default: random; each PNG records its seed)",
    )
    p.add_argument("--num-images", metavar="N", type=int, default=1, help="images per prompt, sampled as one batch")
    p.add_argument(
        "--cfg",
        metavar="W",
        type=float,
        default=None,
        help="guidance weight, 0 for none (default: the model's own, else 3.6 as the reference image script)",
    )
    p.add_argument(
        "--sampler",
        choices=["jacobi", "sequential"],
        default=None,
        help="jacobi: blocks of tokens solved in parallel by Jacobi iteration; sequential: token by "
        "token (default: the model's own, else jacobi)",
    )
    p.add_argument("--jacobi-block-size", metavar="N", type=int, default=16, help="tokens per Jacobi block")
    p.add_argument(
        "--jacobi-threshold",
        metavar="T",
        type=float,
        default=1e-3,
        help="a block is done when an iteration changes it by less than this (relative mean square)",
    )
    p.add_argument("--jacobi-max-iter", metavar="N", type=int, default=32, help="most Jacobi iterations per block")
    p.add_argument(
        "--denoise",
        choices=["auto", "score", "learned", "none"],
        default="auto",
        help="after sampling: the model's learned denoiser, one step along its score, or nothing; "
        "auto: learned if the model has one, none with a fine-tuned VAE, else score",
    )
    p.add_argument(
        "--height",
        metavar="PX",
        type=int,
        default=None,
        help="image height in pixels (default: the model's size, 256 for the release); other sizes "
        "only for models trained on several aspect ratios",
    )
    p.add_argument(
        "--width", metavar="PX", type=int, default=None, help="image width in pixels (default: the model's size)"
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="flow weights precision (auto: bfloat16 for float32 models above 1B parameters, else as stored)",
    )
    p.add_argument(
        "--quantize",
        type=int,
        choices=quant.BITS,
        default=None,
        help="quantize the flow's linear layers to this many bits (default: as stored)",
    )
    p.add_argument(
        "--text-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="text encoder precision (T5 overflows in float16)",
    )
    p.add_argument(
        "--text-quantize",
        type=int,
        choices=quant.BITS,
        default=None,
        help="quantize the text encoder to this many bits (default: not quantized)",
    )
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32", help="VAE precision")
    p.add_argument(
        "--vae-tile",
        metavar="N",
        type=int,
        default=None,
        help="decode in tiles of this many latents, for less memory (default: whole)",
    )
    p.add_argument(
        "--output", metavar="PNG", default="starflow-{seed}.png", help="output PNG; {seed} and {index} are replaced"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--metadata", action="store_true", help="also write a JSON sidecar next to each image")
    p.add_argument("--verbose", action="store_true", help="print stage timings and peak memory")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (they are shown only when stderr is a terminal)"
    )
    p.add_argument(
        "--pipeline-parallel",
        action="store_true",
        help="under mlx.launch: split the deep block's layers across the machines, each loading only "
        "its own (default under mlx.launch: each machine samples its share of the images)",
    )
    from .edit import add_options  # --init-image, --strength, --source-prompt, --mask: a variation (edit.py)

    add_options(p)
    return p


def _finite_at_least(low):
    return lambda v: math.isfinite(v) and v >= low


# Loading options checked before anything loads (generation options: GenerateOptions.validate).
CHECKS = (("vae_tile", "--vae-tile", _finite_at_least(2), "must be at least 2 latents"),)
# GenerateOptions fields whose flag is not --<field-name>.
FLAGS = {"guidance": "--cfg", "prompts": "--prompt"}


def options(args):
    """The command line's generation options: the API's GenerateOptions, validated
    here before anything loads, its errors naming the flag the user typed."""
    from .pipeline import GenerateOptions
    from .sample import OptionError

    opts = GenerateOptions(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=args.seed,
        guidance=args.cfg,
        sampler=args.sampler,
        jacobi_block_size=args.jacobi_block_size,
        jacobi_threshold=args.jacobi_threshold,
        jacobi_max_iter=args.jacobi_max_iter,
        denoise=args.denoise,
        height=args.height,
        width=args.width,
    )
    try:
        return opts.validate()
    except OptionError as e:
        raise ValueError(f"{FLAGS.get(e.option, '--' + e.option.replace('_', '-'))}: {e}") from None


def check_args(args):
    for dest, flag, ok, rule in CHECKS:
        value = getattr(args, dest)
        if value is not None and not ok(value):
            raise ValueError(f"{flag}: {rule}, not {value}")


# PNG metadata names that differ from the option's (--cfg is stored as the pipeline's "guidance").
METADATA_NAMES = {"guidance": "cfg"}
# What the command records besides the pipeline's own parameters, so --from-image loads the same way.
LOAD_OPTIONS = (
    "checkpoint",
    "config",
    "text_encoder",
    "vae",
    "dtype",
    "quantize",
    "text_dtype",
    "text_quantize",
    "vae_dtype",
    "vae_tile",
)


def load_options(args) -> dict:
    """Pipeline.from_pretrained's arguments from a command line that has generate's loading flags."""
    return {"model": args.model, **{k: getattr(args, k) for k in LOAD_OPTIONS}}


def loaded_with(args) -> dict:
    """The loading options given, as the PNG metadata records them."""
    return {k: getattr(args, k) for k in LOAD_OPTIONS if getattr(args, k) is not None}


def run_command(body, bars=None, nothing: str = "no image was written") -> int:
    """A command's body (returning its exit status), with what every command does
    around it: a user's mistake is one `error:` line and status 1, Ctrl-C or a
    cancel says that nothing was written (130), never a traceback."""
    from .distributed import GroupError
    from .pipeline import Cancelled

    try:
        return body()
    except KeyboardInterrupt:
        message, status = f"interrupted: {nothing}", 130
    except Cancelled:
        message, status = f"cancelled: {nothing}", 130
    except (ValueError, ModelNotFound, FileNotFoundError, FileExistsError, GroupError) as e:
        message, status = f"error: {e}", 1
    finally:
        if bars is not None:
            bars.close()
    print(message, file=sys.stderr)
    return status


def report(paths, result, verbose: bool):
    """The files written (stdout), and with --verbose the stages' times and the peak memory."""
    for path in paths:
        print(path, flush=True)
    if verbose:
        for stage, sec in result.timings.items():
            print(f"{STAGES.get(stage, stage):>15}: {sec:8.2f} s", file=sys.stderr)
        print(f"{'peak memory':>15}: {result.peak_memory / 2**30:8.2f} GiB", file=sys.stderr)


def metadata_args(path, p) -> list:
    """A PNG's parameters as command-line arguments of `p` (the ones it has)."""
    if not Path(path).is_file():
        raise ValueError(f"--from-image {path}: no such file")
    try:
        params = read_metadata(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"--from-image {path}: not a PNG with generation parameters ({e})") from None
    if "prompt" not in params or "seed" not in params:
        raise ValueError(f"--from-image {path}: its metadata has no prompt and seed (not written by this command)")
    flags = {a.dest: a.option_strings[0] for a in p._actions if a.option_strings}
    argv = []
    for key, value in params.items():
        dest = METADATA_NAMES.get(key, key)
        if dest in flags and value is not None and dest != "from_image":
            argv.append(f"{flags[dest]}={value}")  # '=' keeps a value starting with '-' a value
    return argv


def parse_args(p, argv):
    """The options: given ones override a --from-image PNG's, which override the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.from_image:
        args = p.parse_args(metadata_args(args.from_image, p) + argv)
    elif not args.prompt and not args.prompt_file:
        p.error("the following arguments are required: --prompt (or --prompt-file, or --from-image)")
    check_args(args)
    if args.prompt_file:
        args.prompt = (args.prompt or []) + prompt_lines(args.prompt_file)
    args.options = options(args)
    return args


def prompt_lines(path) -> list:
    """The prompts of a --prompt-file: one a line, surrounding spaces and blank lines dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompt-file {path}: cannot read it ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {path}: no prompt in it (one prompt a line)")
    return prompts


def output_paths(template: str, seeds, count: int):
    """One path per image; a template without {seed}/{index} gets -{index} for several images."""
    if count > 1 and "{seed}" not in template and "{index}" not in template:
        stem, dot, ext = template.rpartition(".")
        template = f"{stem}-{{index}}.{ext}" if dot else f"{template}-{{index}}"
    paths = []
    for i in range(count):
        seed = seeds[i] if seeds else "latents"
        try:
            paths.append(Path(template.format(seed=seed, index=i)))
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"--output '{template}': only {{seed}} and {{index}} may be used") from None
    if len(set(paths)) != len(paths):
        raise ValueError(f"--output '{template}' gives the same file name to several images; add {{index}}")
    return paths


def check_writable(paths, overwrite):
    for p in paths:
        if p.exists() and not overwrite:
            raise ValueError(f"{p} already exists; choose another --output or pass --overwrite")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ValueError(f"cannot write {p}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {p}: folder {parent} is not writable")


def png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in params.items():
        info.add_text(k, str(v))
    info.add_text("parameters", json.dumps(params))
    return info


def read_metadata(path) -> dict:
    """The generation parameters stored in a PNG written by this command."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(im.text)
    return json.loads(text["parameters"]) if "parameters" in text else text


def atomic_write(path: Path, write):
    # Created with 0666 so the user's umask decides the mode, as for any program's output
    # (mkstemp would make it 0600).
    tmp = (path.parent if str(path.parent) else Path(".")) / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(result, paths, metadata_sidecar=False, load_options=None):
    """The images as PNGs carrying their parameters (and the options the model was loaded with)."""
    version = engine_version()
    for i, (img, path) in enumerate(zip(result.images, paths)):
        params = {"prompt": result.prompts[i], **result.params, **(load_options or {}), "engine": version}
        if result.seeds:
            params["seed"] = result.seeds[i]
        atomic_write(path, lambda tmp, img=img, params=params: img.save(tmp, format="PNG", pnginfo=png_info(params)))
        if metadata_sidecar:
            side = path.with_suffix(".json")
            atomic_write(side, lambda tmp, params=params: Path(tmp).write_text(json.dumps(params, indent=2) + "\n"))


class Bars:
    """One tqdm bar per stage, on a terminal only: a log or a pipe gets no redraws."""

    def __init__(self, enabled):
        self.enabled, self.bar, self.stage = enabled and sys.stderr.isatty(), None, None

    def __call__(self, stage, done, total):
        if not self.enabled:
            return True
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = "tok" if stage in ("deep", "shallow") else ""
            self.bar = tqdm(total=total, desc=STAGES.get(stage, stage), unit=unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        return True

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_args(p, argv):
    """parse_args, or None after one `error:` line naming the option."""
    try:
        return parse_args(p, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def main(argv=None):
    args = read_args(parser(), argv)
    if args is None:
        return 1
    from .edit import run, wants_edit

    if wants_edit(args):  # image to image: edit.run samples from the image's own noise
        return run(args, variation=True)
    from . import distributed
    from .pipeline import expand_seeds

    bars = Bars(not args.no_progress)

    def body():
        group = distributed.init()  # several processes under mlx.launch: rank 0 checks and writes the files
        count = len(args.prompt) * args.num_images
        seeds = distributed.broadcast_seeds(group, expand_seeds(args.seed, count))
        paths = output_paths(args.output, seeds, count)
        distributed.on_rank0(group, lambda: check_writable(paths, args.overwrite))
        pipe = distributed.load(group=group, pipeline_parallel=args.pipeline_parallel, **load_options(args))
        result = pipe.generate(replace(args.options, seed=seeds), progress=bars, group=group)
        bars.close()
        if group is not None and group.rank() > 0:
            return 0
        save(result, paths, args.metadata, loaded_with(args))
        report(paths, result, args.verbose)
        return 0

    return run_command(body, bars)


if __name__ == "__main__":
    sys.exit(main())
