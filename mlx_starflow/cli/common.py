"""What every command line shares: its name, help formatting, flags derived from the
option dataclasses (options.py), progress bars, and one way of ending (a user's mistake
is one `error:` line and status 1, Ctrl-C or a cancel 130, never a traceback)."""

import argparse
import os
import shlex
import sys
from dataclasses import replace

from tqdm import tqdm

from .. import images
from ..distributed import GroupError
from ..loading.hub import DEFAULT_MODEL, ModelNotFound
from ..options import Cancelled, GenerateOptions, LoadOptions, OptionError, specs
from ..tools import machine

# The stages' names on a terminal.
STAGES = {
    "encode": "Encoding image",
    "invert": "Inverting",
    "text": "Encoding prompt",
    "deep": "Deep block",
    "shallow": "Shallow blocks",
    "denoise": "Denoising",
    "decode": "Decoding",
    "sample": "Sampling",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, except where there is no value to show: those help
    texts say what decides it."""

    def _get_help_string(self, action):
        if action.default in (None, False, ""):
            return action.help
        return super()._get_help_string(action)


def prog(command: str) -> str:
    """The name to show: the installed script's when run as one, else `python -m mlx_starflow.<command>`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("mlx-starflow-") else f"python -m mlx_starflow.{command}"


# The commands whose main() starts with prefer_openblas.
OPENBLAS_COMMANDS = ("generate", "edit", "score", "server", "benchmark")


def new_parser(command: str, description: str, epilog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(command), description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    if command in OPENBLAS_COMMANDS:  # read by prefer_openblas before the parser; listed for --help
        p.add_argument(
            "--no-openblas",
            action="store_true",
            help="on Linux: keep MLX's bundled reference BLAS (by default, when the system has OpenBLAS, "
            "the command runs again with it preloaded: float32 4-10x faster; also MLX_STARFLOW_NO_OPENBLAS=1)",
        )
    return p


def flag_of(name: str, m: dict) -> str:
    return m["flag"] or "--" + name.replace("_", "-")


def _limits(m: dict) -> str:
    if m["low"] is None or m["high"] is None or m.get("nargs") == "+" and m["kind"] is not int:
        return ""
    return f" [{m['low']}..{m['high']}]"


def add_fields(p, cls, skip=(), defaults=None, only=None):
    """One flag per described field of an options dataclass: its flag, type, choices, help
    (with its limits) and default come from the field. Returns {dest: flag}."""
    out = {}
    for name, default, m in specs(cls):
        if name in skip or (only is None and not m["cli"]) or (only is not None and name not in only):
            continue
        flag = flag_of(name, m)
        kw = dict(dest=name, default=(defaults or {}).get(name, default), help=m["help"] + _limits(m))
        if m["kind"] is bool or isinstance(default, bool):
            kw["action"] = "store_true"
        else:
            if m["kind"] in (int, float):
                kw["type"] = m["kind"]
            if m["choices"]:
                kw["choices"] = list(m["choices"])
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
            if m["nargs"]:
                kw["nargs"] = m["nargs"]
        p.add_argument(flag, *m.get("aliases", ()), **kw)
        out[name] = flag
    return out


def _meta(cls) -> dict:
    return {name: m for name, _, m in specs(cls)}


def add_load_options(p, skip=()):
    """The loading flags (LoadOptions), with --model."""
    p.add_argument("--model", metavar="NAME", default=None, help=_meta(LoadOptions)["model"]["help"])
    return add_fields(p, LoadOptions, skip=skip)


def load_options(args, skip=()) -> LoadOptions:
    """The LoadOptions a command line was given (validated), its errors naming the flag."""
    given = {n: getattr(args, n) for n, _, m in specs(LoadOptions) if (m["cli"] or n == "model") and n not in skip}
    given["model"] = given.get("model") or DEFAULT_MODEL
    try:
        return LoadOptions(**given).validate()
    except OptionError as e:
        raise ValueError(f"{flag_of(e.option, _meta(LoadOptions)[e.option])}: {e}") from None


def generate_options(args) -> GenerateOptions:
    """The command line's generation options: the API's GenerateOptions, validated here
    before anything loads, its errors naming the flag the user typed."""
    values = {n: getattr(args, n) for n, _, m in specs(GenerateOptions) if m["cli"]}
    try:
        return GenerateOptions(**values).validate()
    except OptionError as e:
        m = _meta(GenerateOptions).get(e.option)
        flag = flag_of(e.option, m) if m else "--" + e.option.replace("_", "-")
        raise ValueError(f"{flag}: {e}") from None


def run_command(body, bars=None, nothing: str = "no image was written") -> int:
    """A command's body (returning its exit status), with what every command does
    around it: a user's mistake is one `error:` line and status 1, Ctrl-C or a
    cancel says that nothing was written (130), never a traceback."""
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


def one_shot(load: LoadOptions) -> LoadOptions:
    """A one-shot command's loading: the prompts encoded first, the text encoder freed before
    the flow is loaded, the flow freed before the VAE decodes (the command's peak is its
    largest stage's: Pipeline's low_memory)."""
    return replace(load, low_memory=True)


# Models whose estimated peak is below this get the precision line only with --verbose.
SAY_PRECISION_ABOVE = 1e9


def say_precision(pipe, verbose: bool = False):
    """The precision policy's one line (what `--dtype auto` chose and why) on stderr, for models
    where the choice matters (an estimated peak above 1 GB) or with --verbose."""
    info = getattr(pipe, "info", {})
    if info.get("precision") and (verbose or info.get("precision_peak", 0) >= SAY_PRECISION_ABOVE):
        print(info["precision"], file=sys.stderr, flush=True)


def report(paths, result, verbose: bool):
    """The files written (stdout), and with --verbose the stages' times and the peak memory."""
    for path in paths:
        print(path, flush=True)
    if verbose:
        for stage, sec in result.timings.items():
            print(f"{STAGES.get(stage, stage):>15}: {sec:8.2f} s", file=sys.stderr)
        print(f"{'peak memory':>15}: {result.peak_memory / 2**30:8.2f} GiB", file=sys.stderr)


class Bars:
    """One tqdm bar per stage, on a terminal only: a log or a pipe gets no redraws."""

    def __init__(self, enabled):
        self.enabled, self.bar, self.stage = enabled and sys.stderr.isatty(), None, None

    def __call__(self, stage, done, total, note=None):
        if not self.enabled:
            return True
        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = "tok" if stage in ("deep", "shallow", "sample") else ""
            self.bar = tqdm(total=total, desc=STAGES.get(stage, stage), unit=unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        if note is not None:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.refresh()
        return True

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def unwrite(paths, sidecars: bool, keep: bool):
    """After a failure or an interrupt part way through a run of several batches: remove
    the images already written (no partial set), or with --keep-partial say which stay."""
    if keep:
        print(
            f"note: kept the {len(paths)} images written before it stopped: {', '.join(map(str, paths))}",
            file=sys.stderr,
        )
        return
    gone = images.unwrite(paths, sidecars)
    print(f"note: removed the {len(gone)} files written before it stopped (--keep-partial keeps them)", file=sys.stderr)


_BLAS_SAID = []
# The environment a front end re-executed with OpenBLAS preloaded carries (never twice), and
# the opt-outs.
REEXEC_ENV = "MLX_STARFLOW_OPENBLAS_REEXEC"
NO_OPENBLAS_ENV = "MLX_STARFLOW_NO_OPENBLAS"
NO_OPENBLAS_FLAG = "--no-openblas"


def prefer_openblas(argv: list, execve=os.execve) -> list:
    """A command line's first step, before any work: on Linux, when MLX runs its bundled
    reference BLAS on the CPU and the system has OpenBLAS (machine.openblas_library), run
    this same command again with it preloaded (float32 4-10x faster, BENCHMARKS.md), once:
    not when a BLAS is already preloaded, not in the re-executed process, not with
    --no-openblas or MLX_STARFLOW_NO_OPENBLAS=1. Returns argv without --no-openblas."""
    if NO_OPENBLAS_FLAG in argv:
        return [a for a in argv if a != NO_OPENBLAS_FLAG]
    env = os.environ
    preloaded = env.get("LD_PRELOAD", "")
    if (
        not sys.platform.startswith("linux")
        or env.get(REEXEC_ENV)
        or env.get(NO_OPENBLAS_ENV, "") not in ("", "0")
        or any(k in preloaded.lower() for k in ("blas", "mkl", "blis"))
        or not machine.reference_blas()
    ):
        return argv
    library = machine.openblas_library()
    if library is None:
        return argv
    sys.stdout.flush()
    sys.stderr.flush()
    preload = f"{library} {preloaded}".strip()
    execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, REEXEC_ENV: "1", "LD_PRELOAD": preload})
    return argv  # only reached when execve is a test's


def say_openblas_once(stream=None) -> bool:
    """In a process prefer_openblas re-executed, on a terminal, once: say that the system's
    OpenBLAS is preloaded and how to run without it."""
    stream = stream or sys.stderr
    if _BLAS_SAID or not os.environ.get(REEXEC_ENV) or not stream.isatty() or machine.reference_blas():
        return False
    _BLAS_SAID.append(True)
    print(
        f"note: running with the system's OpenBLAS preloaded ({os.environ.get('LD_PRELOAD', '').split()[0]}), "
        f"not MLX's bundled reference BLAS; {NO_OPENBLAS_FLAG} or {NO_OPENBLAS_ENV}=1 runs without it",
        file=stream,
        flush=True,
    )
    return True


def command_line(command: str) -> str:
    """This process's command line, to repeat in advice."""
    return " ".join([prog(command), shlex.join(sys.argv[1:])]).strip()


def blas_note_once(command: str, stream=None) -> bool:
    """On Linux, on a terminal, once per process: say that MLX runs its bundled reference BLAS
    (no optimised one loaded) and the one command line that runs `command` with OpenBLAS, or
    that prefer_openblas preloaded it."""
    stream = stream or sys.stderr
    if say_openblas_once(stream):  # prefer_openblas did it
        return True
    if _BLAS_SAID or not stream.isatty() or not machine.reference_blas():
        return False
    _BLAS_SAID.append(True)
    print(machine.blas_note(command), file=stream, flush=True)
    return True
