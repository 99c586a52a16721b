"""The benchmark's words: durations, counts and sizes as a person reads them, each stage's
line, and the summary to quote (the stages themselves: tools/benchmark.py)."""

import argparse
import os

from . import machine

GB = machine.GB


def _gb(n):
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _duration(s):
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _count(n):
    return f"{n / 1e9:.2f} billion" if n >= 1e9 else f"{n / 1e6:.1f} million"


def _times(n):
    return "once" if n == 1 else f"{n} times"


def _q(bits):
    return f", {bits}-bit" if bits else ""


def _precision(args):
    return f"{args.quantize}-bit ({args.dtype} scales)" if args.quantize else args.dtype


def _header(m):
    mem = _gb(m["memory"]) if m["memory"] else "?"
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    pre = f", LD_PRELOAD={m['LD_PRELOAD']}" if m["LD_PRELOAD"] else ""
    load = f", load average {m['load_average'][0]:.1f}" if "load_average" in m else ""
    return f"{m['chip']} ({m['cpus']} cpus, {mem}{load}), {m['os']}, {m['device']}\n{v}{pre}"


def _what(args, rows, side):
    n = "one" if args.batch == 1 else str(args.batch)
    guide = f"with guidance {args.guidance:g}" if args.guidance > 0 else "without guidance"
    return f"{n} {side}x{side} image{'s' if args.batch > 1 else ''} {guide}"


def _spread(t):
    return f" (runs: {_duration(t['min'])} to {_duration(t['max'])})" if t["n"] > 1 else ""


def _block_words(info, limits, same_rows=True):
    """A block's speed against the machine: weights read per token against the copy
    speed and (the deep block: same rows) against its largest layer alone."""
    s = (
        f"{_duration(info['per_token'])} per token; reads {_gb(info['weight_bytes_per_token'])} of weights "
        f"per token: {info['GBps']:.1f} GB/s = {100 * info['GBps'] / limits['copy_GBps']:.0f}% of the memory "
        f"copy speed ({limits['copy_GBps']:.1f} GB/s)"
    )
    if same_rows and "layer_step_GBps" in limits:
        s += (
            f", {100 * info['GBps'] / limits['layer_step_GBps']:.0f}% of its largest layer alone "
            f"({limits['layer_step_GBps']:.1f} GB/s)"
        )
    return s


def _line(name, info, limits=None):
    """One finished stage, as progress."""
    peak = f"; memory peak {_gb(info['peak_memory'])}" if "peak_memory" in info else ""
    t = info.get("time")
    if name == "load":
        layout = ", held input-major (the faster layout for a CPU BLAS)" if info.get("input_major") else ""
        return (
            f"  flow weights {_gb(info['weight_bytes'])} ({_count(info['parameters'])} parameters), "
            f"ready in {_duration(t['median'])}{layout}{peak}"
        )
    if name == "text":
        return f"  {_duration(t['median'])}{_spread(t)}; text encoder weights {_gb(info['weight_bytes'])}{peak}"
    if name in ("vae", "prefill"):
        return f"  {_duration(t['median'])}{_spread(t)}{peak}"
    if name in ("deep", "shallow"):
        how = (
            f"{info['tokens_timed']} tokens timed at each end, extrapolated"
            if info["extrapolated"]
            else "sampled whole"
        )
        return f"  {_duration(info['block_seconds'])} ({how}): {_block_words(info, limits, name == 'deep')}{peak}"
    if name == "denoise":
        if info.get("probed"):
            return (
                f"  about {_duration(info['estimated_seconds'])} (extrapolated from its deep block's layers, "
                f"{_duration(info['probe_seconds'])} run){peak}"
            )
        return f"  {_duration(t['median'])}{_spread(t)}{peak}" if t else "  not needed by this model"
    return f"  {name}: {info}"


def summary_lines(results):
    """The figure to quote, then the stages and the machine, in words."""
    a, st, lim, img = results["args"], results["stages"], results["limits"], results["image"]
    out = []
    side = img["side"]
    approx = "about " if img["extrapolated"] or img["estimated"] else ""
    peak = ""
    if img.get("peak_one_shot"):
        peak = (
            f"; peak of generate {_gb(img['peak_one_shot'])} as the command runs it (one-shot: its largest "
            f"stage, {img['peak_one_shot_stage']}), {_gb(img['peak_resident'])} as an app runs it (resident)"
        )
    out.append(f"summary: {_what(argparse.Namespace(**a), 0, side)}: {approx}{_duration(img['seconds'])}{peak}")
    kv = f", KV cache {a['kv_bits']}-bit" if a.get("kv_bits") else ""
    notes = [
        f"flow {_precision(argparse.Namespace(**a))}, text encoder {a['text_dtype']}{_q(a['text_quantize'])}, "
        f"{a['sampler']} sampling{kv}"
    ]
    if img["extrapolated"]:
        notes.append(f"{' and '.join(img['extrapolated'])} extrapolated from tokens at their start and end")
    left = ["loading the weights"]
    if img["estimated"]:
        notes.append(
            "denoising run up to the deep block's top layer's backward pass (the step's peak), its time "
            "extrapolated from those layers"
        )
    if img["missing"]:
        left.append(f"the stages not run: {', '.join(img['missing'])}")
    notes.append("left out: " + ", ".join(left))
    if img.get("peak_one_shot"):
        notes.append(
            "one-shot peak computed from the stage peaks less the weights a one-shot run does not hold "
            "beside each stage"
        )
    out.append("  (" + "; ".join(notes) + ")")
    out.append("")
    out.append(f"details (median of {a['repeats']} runs; memory peak: MLX's, resident weights included):")
    rows = [("stage", "time", "memory peak", "what the figure is")]

    def peak_of(info):
        return _gb(info["peak_memory"]) if "peak_memory" in info else "-"

    if "load" in st:
        i = st["load"]
        rows.append(
            (
                "flow weights",
                _duration(i["time"]["median"]),
                peak_of(i),
                f"{_gb(i['weight_bytes'])}, {_count(i['parameters'])} parameters"
                f"{' (built at random: loading a folder differs)' if not a['model'] else ''}",
            )
        )
    if "text" in st:
        i = st["text"]
        rows.append(
            (
                "text encoding",
                _duration(i["time"]["median"]),
                peak_of(i),
                f"{i['prompts']} prompts of {i['tokens']} tokens; text encoder {_gb(i['weight_bytes'])}, "
                "loaded beside the flow as generate does",
            )
        )
    if "vae" in st:
        i = st["vae"]
        rows.append(("VAE decode", _duration(i["time"]["median"]), peak_of(i), f"{side}x{side} pixels"))
    if "prefill" in st:
        i = st["prefill"]
        rows.append(
            (
                "text prefix",
                _duration(i["time"]["median"]),
                peak_of(i),
                f"the text through the deep block once: {i['GFLOPs']:.1f} GFLOP/s = "
                f"{100 * i['GFLOPs'] / lim['layer_many_GFLOPs']:.0f}% of its largest layer alone on "
                f"many rows ({lim['layer_many_GFLOPs']:.1f} GFLOP/s)",
            )
        )
    for k, name in (("deep", "deep block"), ("shallow", "shallow blocks")):
        if k in st:
            i = st[k]
            where = (
                f"{i['blocks']} blocks, one row per image; "
                if k == "shallow"
                else f"KV cache {_gb(i['kv_cache_bytes'])}; "
            )
            rows.append(
                (
                    name,
                    ("~" if i["extrapolated"] else "") + _duration(i["block_seconds"]),
                    peak_of(i),
                    where + _block_words(i, lim, k == "deep"),
                )
            )
    if "denoise" in st:
        i = st["denoise"]
        if "estimated_seconds" in i:
            rows.append(
                (
                    "denoising",
                    "~" + _duration(i["estimated_seconds"]),
                    peak_of(i) if "peak_memory" in i else "-",
                    f"run up to the deep block's top layer's backward pass ({_duration(i['probe_seconds'])}): "
                    "the step's peak; its time extrapolated from those layers"
                    if i.get("probed")
                    else "estimated: four passes over the model at the text prefix's speed (not run)",
                )
            )
        elif "time" in i:
            rows.append(("denoising", _duration(i["time"]["median"]), peak_of(i), "the step after sampling"))
    rows.append(
        (
            "one image",
            approx.replace("about ", "~") + _duration(img["seconds"]),
            _gb(img["peak_memory"]) if img["peak_memory"] else "-",
            "the stages above but the weights; the peak: resident, as an app's Pipeline",
        )
    )
    if img.get("peak_one_shot"):
        rows.append(
            (
                "generate, one-shot",
                "",
                _gb(img["peak_one_shot"]),
                f"the largest stage alone ({img['peak_one_shot_stage']}), as the command runs it",
            )
        )
    w0, w1, w2 = (max(len(r[j]) for r in rows) for j in range(3))
    out += [f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]}" for r in rows]
    out.append("")
    out.append("the machine:")
    out.append(
        f"  memory copy speed: {lim['copy_GBps']:.1f} GB/s (numpy {lim['numpy_copy_GBps']:.1f}, "
        f"MLX {lim['mlx_copy_GBps']:.1f}): the limit for reading weights"
    )
    out.append(
        f"  float32 matrix multiply, 1024x1024: MLX {lim['mlx_f32_matmul_GFLOPs']:.1f} GFLOP/s, numpy "
        f"{lim['numpy_f32_matmul_GFLOPs']:.1f} GFLOP/s"
        + (" (MLX's BLAS is slow, see above)" if lim["slow_blas"] else "")
    )
    if "layer_many_GFLOPs" in lim:
        out.append(
            f"  the model's largest layer alone ({lim['layer']}): {lim['layer_many_GFLOPs']:.1f} GFLOP/s on "
            f"{lim['layer_many_rows']} rows (the limit for the text prefix and denoising); it reads its "
            f"weights at {lim['layer_step_GBps']:.1f} GB/s on {lim['layer_step_rows']} rows "
            "(the limit for a token)"
        )
    m = results["machine"]
    if "load_average" in m and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if max(load, m["load_average"][0]) > (m["cpus"] or 1) / 2:
            out.append(
                f"  load average {m['load_average'][0]:.1f} at the start, {load:.1f} at the end: other "
                "work on the machine slows every figure"
            )
    return out


def print_summary(results, log=print):
    log("")
    for line in summary_lines(results):
        log(line)
