"""The generation command line's flags and their parsing, shared by generate and edit:
the options' flags (derived from options.py), --prompt-file, --from-image (which replays
settings, never places), the loading flags, the outputs, and the editing flags."""

import sys
from pathlib import Path

from ..editing import DEFAULT_STRENGTH
from ..images import read_metadata
from ..loading.hub import DEFAULT_MODEL
from ..options import GenerateOptions, LoadOptions, specs
from .common import add_fields, add_load_options, flag_of, generate_options, load_options, new_parser

MODEL_DEFAULTS = (
    "A model folder may carry its own defaults, used where an option is not given: its sampling "
    'settings ("sampling" in its config.json) and its image size. The demo samples with guidance '
    "1.0, sequentially, at 32x32."
)


def parser(command: str = "generate", description: str = "Generate images with STARFlow on MLX."):
    p = new_parser(command, description, epilog=MODEL_DEFAULTS)
    add_fields(p, GenerateOptions)
    p.add_argument(
        "--prompt-file",
        metavar="FILE",
        default=None,
        help="prompts from a text file, one a line (blank lines skipped), after any --prompt",
    )
    p.add_argument(
        "--from-image",
        metavar="PNG",
        default=None,
        help="make an image again: every parameter from the metadata of a PNG this command wrote; "
        "options given here override it",
    )
    add_load_options(p)
    p.add_argument(
        "--output", metavar="PNG", default="starflow-{seed}.png", help="output PNG; {seed} and {index} are replaced"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument(
        "--keep-partial",
        action="store_true",
        help="keep the images already written when a run of several batches fails or is interrupted "
        "(default: they are removed, so no partial set is left)",
    )
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
    add_edit_options(p)  # --init-image, --strength, --source-prompt, --mask: a variation
    return p


def metadata_args(path) -> list:
    """A PNG's replayable parameters as command-line arguments."""
    if not Path(path).is_file():
        raise ValueError(f"--from-image {path}: no such file")
    try:
        params = read_metadata(path)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"--from-image {path}: not a PNG with generation parameters ({e})") from None
    if "prompt" not in params or "seed" not in params:
        raise ValueError(f"--from-image {path}: its metadata has no prompt and seed (not written by this command)")
    flags = replayable()
    argv = []
    for key, value in params.items():
        dest = {"prompt": "prompts"}.get(key, key)  # one image, one prompt
        if dest in flags and value is not None:
            argv.append(f"{flags[dest]}={value}")  # '=' keeps a value starting with '-' a value
    return argv


def replayable() -> dict:
    """{option: flag} of what an image's metadata may set: settings, never places (paths, model names)."""
    flags = {
        name: flag_of(name, m)
        for cls in (GenerateOptions, LoadOptions)
        for name, _, m in specs(cls)
        if m["cli"] and not m["place"]
    }
    return {**flags, **EDIT_SETTINGS}


def parse_args(p, argv):
    """The options: given ones override a --from-image PNG's, which override the defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.from_image:
        args = p.parse_args(metadata_args(args.from_image) + argv)
        made_with = read_metadata(args.from_image).get("model")
        if args.model is None and made_with not in (None, DEFAULT_MODEL):
            raise ValueError(
                f"--from-image {args.from_image}: it was made with --model {made_with}; give --model "
                "(an image's metadata replays settings, never what is loaded or where it is written)"
            )
    elif not args.prompts and not args.prompt_file:
        p.error("the following arguments are required: --prompt (or --prompt-file, or --from-image)")
    if args.prompt_file:
        args.prompts = (args.prompts or []) + prompt_lines(args.prompt_file)
    args.load = load_options(args)
    args.options = generate_options(args)
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


def read_args(p, argv):
    """parse_args, or None after one `error:` line naming the option."""
    try:
        return parse_args(p, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


# The editing flags an image's metadata may replay (settings; the image and mask are places).
EDIT_SETTINGS = {"source_prompt": "--source-prompt", "strength": "--strength"}


def add_edit_options(p):
    """The editing options, shared by `edit` and `generate --init-image` (a variation)."""
    g = p.add_argument_group("editing by exact inversion")
    g.add_argument(
        "--image",
        "--init-image",
        dest="image",
        metavar="IMAGE",
        default=None,
        help="the image to edit, resized to cover the model's size and centre-cropped (required by "
        "edit; generate's default: none, fresh noise; with one, a variation of it under the prompt)",
    )
    g.add_argument(
        "--source-prompt",
        metavar="P",
        default=None,
        help="what the image shows: it is inverted to its noise under this prompt (default: empty "
        "for edit; the prompt itself for generate --init-image)",
    )
    g.add_argument(
        "--strength",
        metavar="S",
        type=float,
        default=None,
        help=f"0 keeps the image's own noise (the closest edit), 1 draws fresh noise from the seed "
        f"(ignores the image); blended as sqrt(1 - s^2) z + s e (default: {DEFAULT_STRENGTH})",
    )
    g.add_argument(
        "--mask",
        metavar="IMAGE",
        default=None,
        help="black and white image, white where the image may change: the rest is kept exactly "
        "(in latent space); resized to the image if its size differs (default: none, all may change)",
    )


def wants_edit(args) -> bool:
    """Whether a `generate` command line asks for an image edit (a variation)."""
    return any(getattr(args, k, None) is not None for k in ("image", "source_prompt", "strength", "mask"))
