"""python -m mlx_starflow.generate --model apple/starflow-v --prompt "..." --frames 81 --fps 16 --output clip.mp4

A clip from a video model (STARFlow-V): `generate` hands its command line here when it
asks for frames (--frames, --fps, --from-video, --frames-dir) or names a video model.
The MP4 (H.264) is written frame by frame as they are decoded into a temporary file and
renamed into place at the end: the output holds a whole clip or nothing. It carries its
parameters (JSON in the MP4's comment tag); `--from-video clip.mp4` makes it again.
"""

import sys
from pathlib import Path

from ..loading.video_resolve import VIDEO_MODEL, is_video_model
from ..options import LoadOptions, OptionError, specs
from ..video import VideoOptions, VideoPipeline, random_seed
from ..videos import (
    Mp4Writer,
    check_codec,
    check_output,
    clip_metadata,
    preview_paths,
    read_metadata,
    save_frames,
    save_preview,
    unwrite_frames,
)
from .common import STAGES, Bars, add_fields, flag_of, new_parser, run_command, say_precision

# The flags that make a `generate` command line a clip's.
VIDEO_FLAGS = ("--frames", "--fps", "--from-video", "--frames-dir", "--aspect-ratio")
# Loading flags a video model takes (LoadOptions' fields); dtype "auto": the precision policy for video.
LOAD_FIELDS = (
    "checkpoint",
    "config",
    "text_encoder",
    "vae",
    "dtype",
    "quantize",
    "q_group_size",
    "text_dtype",
    "text_quantize",
    "vae_dtype",
)
STAGES_VIDEO = {**STAGES, "frame": "Decoding frames", "sample": "Sampling"}


def _given(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _value(argv, flag: str):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def wanted(argv) -> bool:
    """Whether a `generate` command line is a clip's: video flags, or a video model."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(_given(argv, f) for f in VIDEO_FLAGS):
        return True
    try:
        return is_video_model(_value(argv, "--model"), _value(argv, "--checkpoint"), _value(argv, "--config"))
    except OSError:
        return False


def parser():
    p = new_parser("generate", "Generate a clip with a STARFlow-V video model on MLX (an MP4, H.264).")
    add_fields(p, VideoOptions)
    p.add_argument(
        "--from-video",
        metavar="MP4",
        default=None,
        help="make a clip again: every setting from the metadata of an MP4 this command wrote (never the model "
        "or a path); options given here override it",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        default=VIDEO_MODEL,
        help="a converted STARFlow-V folder, a .pth "
        "checkpoint or a folder holding one, 'demo-video', or apple/starflow-v (the release)",
    )
    add_fields(p, LoadOptions, only=LOAD_FIELDS)
    p.add_argument("--output", metavar="MP4", default="starflow-v-{seed}.mp4", help="the MP4; {seed} is replaced")
    p.add_argument("--frames-dir", metavar="DIR", default=None, help="also write every frame as a PNG into DIR")
    p.add_argument(
        "--preview-dir",
        metavar="DIR",
        default=None,
        help="write each frame as preview-NNNN.png into DIR as soon as it is sampled, before the denoising (the "
        "previews stay when the clip stops; with the Wan2.2 VAE each is decoded then too: a second decode "
        "of the clip, and its frame caches held while sampling)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--verbose", action="store_true", help="print stage timings and peak memory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (only drawn on a terminal)")
    return p


def replayable() -> dict:
    """{option: flag} an MP4's metadata may set: settings (and the prompt and seed), never places."""
    out = {n: flag_of(n, m) for n, _, m in specs(VideoOptions) if m["cli"]}
    for n, _, m in specs(LoadOptions):
        if n in LOAD_FIELDS and not m["place"]:
            out[n] = flag_of(n, m)
    return out


def metadata_args(path) -> list:
    try:
        params = read_metadata(path)
    except ValueError as e:
        raise ValueError(f"--from-video {e}") from None
    if "prompt" not in params or "seed" not in params:
        raise ValueError(f"--from-video {path}: its metadata has no prompt and seed (not written by this command)")
    flags = replayable()
    return [f"{flags[k]}={v}" for k, v in params.items() if k in flags and v is not None]


def _meta(cls) -> dict:
    return {n: m for n, _, m in specs(cls)}


def read_args(argv):
    p = parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.from_video:
        args = p.parse_args(metadata_args(args.from_video) + argv)
    elif args.prompt is None:
        p.error("the following arguments are required: --prompt (or --from-video)")
    values = {n: getattr(args, n) for n, _, m in specs(VideoOptions) if m["cli"]}
    values["preview"] = args.preview_dir is not None
    try:
        args.options = VideoOptions(**values).validate()
    except OptionError as e:
        raise ValueError(f"{flag_of(e.option, _meta(VideoOptions)[e.option])}: {e}") from None
    args.load = {n: getattr(args, n) for n in LOAD_FIELDS}
    return args


class Progress:
    """The bars of a clip's events. A streamed clip (frames out while it samples) has one
    "Sampling" bar over the deep block's tokens, saying how many frames are out."""

    def __init__(self, bars, streamed: bool, frames: int):
        self.bars, self.streamed, self.frames = bars, streamed, frames
        self.out, self.deep = 0, (0, 1)

    def __call__(self, event):
        deep_done = self.deep[0] >= self.deep[1]  # Jacobi's previews: then a pass over all frames
        if (
            not self.streamed
            or event.stage not in ("deep", "shallow", "preview")
            or (event.stage == "shallow" and deep_done)
        ):
            return self.bars(event.stage, event.done, event.total)
        if event.stage == "preview":
            self.out = event.done
        elif event.stage == "deep":
            self.deep = (event.done, event.total)
        return self.bars("sample", *self.deep, note=f"{self.out}/{self.frames} frames sampled")


def _frame_flag(e: OptionError) -> str:
    m = _meta(VideoOptions).get(e.option)
    return flag_of(e.option, m) if m else "--" + e.option.replace("_", "-")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    bars = Bars("--no-progress" not in argv)

    def body():
        args = read_args(argv)
        model = args.model
        if not is_video_model(model, args.load["checkpoint"], args.load["config"]):
            raise ValueError(
                f"--frames: '{model}' is an image model; --frames, --fps and an .mp4 --output are for video "
                "models (STARFlow-V: --model apple/starflow-v, a converted STARFlow-V folder, or demo-video)"
            )
        if Path(str(args.output)).suffix.lower() == ".png":
            raise ValueError(
                f"--output '{args.output}': '{model}' is a video model and makes clips, not images: name the "
                "output .mp4 (--frames-dir DIR also writes its frames as PNGs)"
            )
        check_codec()
        opts = args.options
        if opts.seed is None:
            opts.seed = random_seed()
        try:
            out = Path(str(args.output).format(seed=opts.seed))
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"--output '{args.output}': only {{seed}} may be used") from None
        check_output(out, args.overwrite)
        pipe = VideoPipeline.from_pretrained(model, **args.load)
        say_precision(pipe, args.verbose)
        try:
            opts = pipe.resolve_options(opts)
        except OptionError as e:
            raise ValueError(f"{_frame_flag(e)}: {e}") from None
        recorded = {k: v for k, v in args.load.items() if k in replayable() and v is not None}
        params = clip_metadata(opts.prompt, opts.seed, pipe.params(opts), recorded)
        previews = preview_paths(args.preview_dir, opts.frames, args.overwrite) if args.preview_dir else None
        progress = Progress(bars, pipe.streamed(opts), opts.frames)
        frames = []
        with Mp4Writer(out, opts.fps, params) as writer:
            for event in pipe.generate_steps(opts):
                progress(event)
                if event.stage == "preview" and event.frame is not None and previews:
                    save_preview(previews[event.index], event.frame)
                elif event.stage == "frame":
                    writer.add(event.frame)
                    if args.frames_dir:
                        frames.append(event.frame)
            bars.close()
            written = save_frames(args.frames_dir, frames, params, args.overwrite) if args.frames_dir else []
            try:
                writer.close()
            except BaseException:
                unwrite_frames(written)
                raise
        print(out, flush=True)
        if args.verbose:
            r = event.result
            for stage, sec in r.timings.items():
                print(f"{STAGES_VIDEO.get(stage, stage):>15}: {sec:8.2f} s", file=sys.stderr)
            print(f"{'peak memory':>15}: {r.peak_memory / 2**30:8.2f} GiB", file=sys.stderr)
        return 0

    return run_command(body, bars, nothing="no clip was written")


if __name__ == "__main__":
    sys.exit(main())
