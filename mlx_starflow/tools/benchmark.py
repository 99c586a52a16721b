"""`python -m mlx_starflow.benchmark`: how long one image takes and how much memory
it needs, stage by stage, beside what the machine can do. One concern, the benchmark's
stages and the run that plans and measures them (its words: report.py).

Without --model the weights are random, of exactly the released 3B shapes, built
directly in the requested precision (random_models.py). Before the long work the
first token of each block is timed: a block that would take long is timed on a
few tokens at each end of its sequence and extrapolated (a token's cost is affine
in its position), and the run says so before it starts.

    python -m mlx_starflow.benchmark                          # the 3B model as generate runs it
    python -m mlx_starflow.benchmark --dtype float32 --tokens 4 --json f32.json
    python -m mlx_starflow.benchmark --quantize 4 --stages load,deep,shallow
    python -m mlx_starflow.benchmark --model path/to/converted
"""

import argparse
import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..likelihood import batch_size_for, log_densities
from ..loading import device
from ..loading.weights import DTYPES, load_flow, read_config
from ..models.config import FlowConfig
from ..models.flow import Flow, IdentityBlock
from ..models.t5 import T5Config, T5Encoder
from ..sample import Jacobi, block_steps, sampling_order
from ..sample import invert as flow_invert
from . import machine
from .machine import times
from .precision import study
from .random_models import ARCHS, flow_config, random_flow, random_t5, random_vae
from .report import _count, _duration, _gb, _header, _line, _precision, _q, _times, _what, print_summary, summary_lines  # noqa: F401 (the command's)

STAGES = ("text", "load", "prefill", "deep", "shallow", "denoise", "vae")
# What only a flow does, beside generating: measured when asked (--stages ...,score,invert).
EXTRA_STAGES = ("score", "invert")
GB = machine.GB
# --tokens auto: a block whose first token says it takes longer than this is timed
# on AUTO_TOKENS tokens at each end and extrapolated; a denoising pass estimated
# longer than AUTO_DENOISE is not run; a stage whose first run takes longer than
# AUTO_ONCE is measured by that run alone.
AUTO_BLOCK, AUTO_TOKENS, AUTO_DENOISE, AUTO_ONCE = 60.0, 4, 600.0, 30.0


def peak_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


class Stage:
    """Records a stage's peak MLX memory (resident weights included) and the process's peak RSS."""

    def __init__(self, results, name):
        self.results, self.name = results, name
        self.info = {}

    def __enter__(self):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        self.info["resident_before"] = mx.get_active_memory()
        return self.info

    def __exit__(self, *exc):
        if exc[0] is None:
            self.info.update(peak_memory=mx.get_peak_memory(), peak_rss=peak_rss())
            self.results[self.name] = self.info


@dataclass
class Run:
    """What the stages share: the options, the model and the inputs made so far."""

    args: argparse.Namespace
    cfg: FlowConfig
    log: Callable
    results: dict
    model: Optional[Flow] = None
    vae: Optional[nn.Module] = None
    y: Optional[mx.array] = None  # text rows: conditional then unconditional when guiding
    caches: Optional[list] = None  # the deep block's, holding the text prefix

    @property
    def stages(self):
        return self.results["stages"]

    @property
    def batch(self):
        return self.args.batch

    @property
    def rows(self):  # rows through the deep block: the guided batch is doubled
        return 2 * self.batch if self.args.guidance > 0 else self.batch

    @property
    def image_side(self):
        return self.cfg.image_size or self.cfg.grid_size * 8

    @property
    def kv_bits(self):  # the deep block's KV cache at 8 bits (--kv-bits)
        return getattr(self.args, "kv_bits", None)

    @property
    def loop(self):
        return {"jacobi": Jacobi() if self.args.sampler == "jacobi" else None}

    def time(self, fn, info):
        """Time fn into info["time"]: --warmup runs, then --repeats; with --tokens auto a
        first run over AUTO_ONCE seconds is the only one."""
        a = self.args
        if a.tokens == "auto" and a.warmup:
            t = time.perf_counter()
            fn()
            first = time.perf_counter() - t
            if first > AUTO_ONCE:
                info["time"] = summary([first])
                return
            ts = machine.times(fn, a.repeats, a.warmup - 1)
        else:
            ts = machine.times(fn, a.repeats, a.warmup)
        info["time"] = summary(ts)


def _weights(module, skip=()):
    return sum(v.nbytes for k, v in tree_flatten(module.parameters()) if not k.startswith(skip))


def parameter_count(model) -> int:
    """The model's parameters as the checkpoint counts them: a quantized layer's weight
    as out x in (not its packed words), its scales and offsets not at all."""
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            packed = m.weight.size + m.scales.size + (m.biases.size if m.get("biases") is not None else 0)
            n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits - packed
    return n


def linear_params(block):
    """Multiply-adds per row of the block's transformer linears (quantized ones counted unpacked)."""
    n = 0
    for _, m in block.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            n += m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        elif isinstance(m, nn.Linear):
            n += m.weight.size
    return n - (block.proj_txt.weight.size if "proj_txt" in block else 0)


def largest_linear(block):
    """The largest linear of the block's first layer (the MLP's width -> 4 x width), as
    the model holds it."""
    linears = [m for _, m in block.attn_blocks[0].named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear)]
    # unpacked size, then the wider output
    return max(
        linears,
        key=lambda m: (m.weight.size * (32 // m.bits if isinstance(m, nn.QuantizedLinear) else 1), m.weight.shape[0]),
    )


def sampled_blocks(model):
    """(deep block, shallow blocks with layers)."""
    return model.blocks[-1], [b for b in model.blocks[:-1] if not isinstance(b, IdentityBlock)]


# -- timing tokens through the sampler -------------------------------------------------------


def sample_tokens(block, z, caches, prefix, start, count, rope=None, cond=None, guidance=0.0, **loop):
    """Sample `count` tokens of z (B', N, D) from position `start` of the block's sequence
    (the caches hold `prefix` positions before it) through sample.block_steps, stopping
    there. Returns [(tokens done, time)], starting with (0, the time before the first step)."""
    for c in caches:
        c.offset = prefix + start
    stamps = [(0, time.perf_counter())]
    steps = block_steps(block, z, caches, rope, cond, guidance, **loop)
    try:
        for done in steps:
            stamps.append((done, time.perf_counter()))
            if done >= count:
                break
    finally:
        steps.close()
    return stamps


def time_block_ends(block, z, caches, prefix, tokens, repeats, rope=None, cond=None, guidance=0.0, log=None, **loop):
    """Seconds per token of `tokens` tokens at the start and at the end of the block's
    sequence, each run after one untimed token (or Jacobi chunk) that carries the step's
    set-up and compilation. The cost of a token is affine in its position (fixed weight
    reads, attention over the prefix), so the block takes about N x their mean."""
    N = z.shape[1]
    jac = loop.get("jacobi")
    unit = jac.block_size if jac is not None else 1
    span = min(N, unit * (1 + math.ceil(tokens / unit)))
    end = max(0, N - span - (1 if loop.get("overlap") else 0))  # overlap queues one token ahead
    out = {"start": [], "end": []}
    for r in range(repeats):
        for where, start in (("start", 0), ("end", end)):
            stamps = sample_tokens(block, z, caches, prefix, start, span, rope, cond, guidance, **loop)
            (d0, t0), (d1, t1) = stamps[1], stamps[-1]
            out[where].append((t1 - t0) / max(d1 - d0, 1))
        if log:
            log(
                f"    run {r + 1}/{repeats}: {_duration(out['start'][-1])} per token at the start, "
                f"{_duration(out['end'][-1])} at the end"
            )
    info = {"per_token_start": summary(out["start"]), "per_token_end": summary(out["end"]), "tokens_timed": span - unit}
    info["per_token"] = (info["per_token_start"]["median"] + info["per_token_end"]["median"]) / 2
    info["block_seconds"] = info["per_token"] * N
    info["extrapolated"] = True
    return info


def time_whole_block(block, z, caches, prefix, repeats, rope=None, cond=None, guidance=0.0, log=None, **loop):
    """The whole block sampled `repeats` times (its prefix already in the caches)."""
    N = z.shape[1]
    runs = []
    for r in range(repeats):
        stamps = sample_tokens(block, z, caches, prefix, 0, N, rope, cond, guidance, **loop)
        runs.append(stamps[-1][1] - stamps[0][1])
        if log:
            log(f"    run {r + 1}/{repeats}: {_duration(runs[-1])}")
    med = statistics.median(runs)
    return {"run": summary(runs), "per_token": med / N, "tokens_timed": N, "block_seconds": med, "extrapolated": False}


def first_token(block, z, caches, prefix, rope=None, cond=None, guidance=0.0, **loop):
    """Seconds of the first token (or Jacobi chunk, per token) of a block, set-up and
    compilation included."""
    stamps = sample_tokens(block, z, caches, prefix, 0, 1, rope, cond, guidance, **loop)
    (_, t0), (d1, t1) = stamps[0], stamps[-1]
    return (t1 - t0) / max(d1, 1)


WARM_TOKENS = 2  # tokens (or Jacobi chunks) timed after the first for the plan


def warm_token(block, z, caches, prefix, rope=None, cond=None, guidance=0.0, **loop):
    """(first, warm): seconds of the first token (set-up and compilation included) and per
    token of the WARM_TOKENS tokens (or Jacobi chunks) after it, warmed up: the estimate the
    plan is made from (the first token's cold time overstates a block many times)."""
    jac = loop.get("jacobi")
    unit = jac.block_size if jac is not None else 1
    count = min(z.shape[1], unit * (1 + WARM_TOKENS))
    stamps = sample_tokens(block, z, caches, prefix, 0, count, rope, cond, guidance, **loop)
    (_, t0), (d1, t1), (d2, t2) = stamps[0], stamps[1], stamps[-1]
    first = (t1 - t0) / max(d1, 1)
    return first, ((t2 - t1) / (d2 - d1) if d2 > d1 else first)


# -- the stages ---------------------------------------------------------------------------------


def stage_load(run):
    """Build (or load) the flow and the VAE, resident from then on as in a pipeline."""
    a = run.args
    quant = {"bits": a.quantize, "group_size": a.q_group_size} if a.quantize else None
    with Stage(run.stages, "load") as info:
        t = time.perf_counter()
        if a.model:
            run.model, unquantized = load_flow(a.model, dtype=a.dtype if a.model_dtype else None, quantize=quant), []
        else:
            run.model, unquantized = random_flow(run.cfg, DTYPES[a.dtype], quant, seed=a.seed)
        if a.layout == "auto":
            device.prepare(run.model)  # what the pipeline does after loading
        if "vae" in a.stages:
            run.vae = device.prepare(random_vae(a.arch, DTYPES[a.vae_dtype], seed=a.seed))
        info["time"] = summary([time.perf_counter() - t])
        params = tree_flatten(run.model.parameters())
        info["parameters"] = parameter_count(run.model)
        info["weight_bytes"] = sum(v.nbytes for _, v in params)
        info["vae_weight_bytes"] = _weights(run.vae) if run.vae is not None else 0
        info["unquantized"] = unquantized
        layer = largest_linear(sampled_blocks(run.model)[0])
        # device.prepare holds float32 transformer linears input-major on a CPU
        info["input_major"] = (
            a.layout == "auto" and device.on_cpu() and type(layer) is nn.Linear and layer.weight.dtype == mx.float32
        )
    run.cfg = run.model.config
    return info


def stage_text(run):
    """Encode the prompt and the unconditional prompt with a text encoder of the
    architecture's shapes, built beside the resident flow and freed after, as the
    pipeline does."""
    a = run.args
    n_txt = run.cfg.txt_size
    with Stage(run.stages, "text") as info:
        t = time.perf_counter()
        t5 = device.prepare(
            random_t5(
                a.arch,
                DTYPES[a.text_dtype],
                a.text_quantize and {"bits": a.text_quantize, "group_size": a.q_group_size},
                seed=a.seed,
            )
        )
        info["build"] = time.perf_counter() - t
        info["weight_bytes"] = _weights(t5)
        info["prompts"], info["tokens"] = run.rows, n_txt
        ids = mx.random.randint(0, t5.config.vocab_size, (run.rows, n_txt), key=mx.random.key(a.seed + 1))
        mask = mx.broadcast_to((mx.arange(n_txt) < n_txt // 2).astype(mx.int32), (run.rows, n_txt))

        def encode():
            h = t5(ids, mask)
            out = h * mask[..., None].astype(h.dtype)
            mx.eval(out)
            return out

        run.time(encode, info)
        y = encode().astype(mx.float32)
        t5 = None  # freed before sampling, as the pipeline does
    if y.shape[-1] == run.cfg.txt_dim:  # a --model with another text width keeps random rows
        run.y = y
    return info


def stage_vae(run):
    """Decode one batch of latents to images."""
    vae, side = run.vae, run.cfg.grid_size
    lat = mx.random.normal((run.batch, side, side, vae.config.latent_channels), key=mx.random.key(run.args.seed + 3))
    lat = lat / vae.config.scaling_factor
    with Stage(run.stages, "vae") as info:
        run.time(lambda: mx.eval(vae.decode(lat, tile=run.args.vae_tile)), info)
        info["image"] = run.image_side
    return info


def stage_prefill(run):
    """Feed the text prefix (both guidance halves) through the deep block once, into its KV caches."""
    deep, _ = sampled_blocks(run.model)
    text = run.y if run.args.guidance > 0 else run.y[: run.batch]
    rope = run.model.rope(True, run.cfg.grid_size, run.cfg.grid_size, run.cfg.txt_size)
    with Stage(run.stages, "prefill") as info:
        times = []
        for i in range(run.args.repeats + 1):  # the first is the warm-up
            run.caches = None
            run.caches = deep.new_caches(run.rows, run.cfg.txt_size + run.cfg.num_tokens, run.kv_bits)
            t = time.perf_counter()
            deep.prefill(text, rope, run.caches)
            times.append(time.perf_counter() - t)
            if i == 0 and run.args.tokens == "auto" and times[0] > AUTO_ONCE:
                break  # a slow prefix is measured by its first run alone
        info["time"] = summary(times[1:] or times)
        rows = run.rows * run.cfg.txt_size
        info["GFLOPs"] = 2 * linear_params(deep) * rows / info["time"]["median"] / GB
        info["kv_cache_bytes"] = sum(c.nbytes for c in run.caches)
    return info


def _deep_inputs(run):
    deep, _ = sampled_blocks(run.model)
    side, n_txt = run.cfg.grid_size, run.cfg.txt_size
    if run.caches is None:  # no prefill stage: the prefix's contents do not change a token's cost
        run.caches = deep.new_caches(run.rows, n_txt + run.cfg.num_tokens, run.kv_bits)
    z = mx.random.normal((run.batch, run.cfg.num_tokens, run.cfg.token_dim), key=mx.random.key(run.args.seed + 2))
    z = mx.concatenate([z, z]) if run.args.guidance > 0 else z
    return deep, z, run.model.rope(True, side, side, n_txt), n_txt


def _shallow_inputs(run):
    _, shallow = sampled_blocks(run.model)
    side = run.cfg.grid_size
    z = mx.random.normal((run.batch, run.cfg.num_tokens, run.cfg.token_dim), key=mx.random.key(run.args.seed + 4))
    return shallow, z, run.model.rope(False, side, side, 0)


def stage_deep(run, whole):
    """The deep block: every token reads all its weights, for both guidance halves at once."""
    deep, z, rope, n_txt = _deep_inputs(run)
    a, guidance = run.args, run.args.guidance
    with Stage(run.stages, "deep") as info:
        if whole:
            info.update(
                time_whole_block(deep, z, run.caches, n_txt, a.repeats, rope, None, guidance, run.log, **run.loop)
            )
        else:
            info.update(
                time_block_ends(
                    deep, z, run.caches, n_txt, a.tokens_n, a.repeats, rope, None, guidance, run.log, **run.loop
                )
            )
        info["kv_cache_bytes"] = sum(c.nbytes for c in run.caches)
        info["weight_bytes_per_token"] = _weights(deep, skip=("proj_txt",))  # proj_txt serves the prefix only
        info["GBps"] = info["weight_bytes_per_token"] / info["per_token"] / GB
    return info


def stage_shallow(run, whole):
    """The shallow blocks: no text, one row per image."""
    shallow, z, rope = _shallow_inputs(run)
    a = run.args
    with Stage(run.stages, "shallow") as info:
        if whole:
            total, runs = 0.0, []
            for b in shallow:
                caches = b.new_caches(run.batch, z.shape[1])
                r = time_whole_block(b, z, caches, 0, a.repeats, rope, log=None, **run.loop)
                total += r["block_seconds"]
                runs.append(r["per_token"])
                del caches
            info.update(
                per_token=statistics.median(runs), block_seconds=total, extrapolated=False, tokens_timed=z.shape[1]
            )
            run.log(f"    {len(shallow)} blocks: {_duration(total)}")
        else:
            block = shallow[-1]
            caches = block.new_caches(run.batch, z.shape[1])
            info.update(time_block_ends(block, z, caches, 0, a.tokens_n, a.repeats, rope, log=run.log, **run.loop))
            info["block_seconds"] *= len(shallow)
            del caches
        info["blocks"] = len(shallow)
        info["weight_bytes_per_token"] = _weights(shallow[-1])
        info["GBps"] = info["weight_bytes_per_token"] / info["per_token"] / GB
    return info


def denoise_flops(run):
    """Multiply-adds x 2 of the score step: one density pass over every block (the deep
    one with its text prefix), its recomputation and its backward pass (about two
    passes): four passes in all."""
    n, txt = run.cfg.num_tokens, run.cfg.txt_size
    one = sum(
        2 * linear_params(b) * run.batch * (n + (txt if b.has_text else 0))
        for b in run.model.blocks
        if not isinstance(b, IdentityBlock)
    )
    return 4 * one


def denoise_probe(model, x, y=None) -> dict:
    """The score step run up to the deep block's top layer's backward pass, then stopped: its
    peak is the whole step's (every layer input of the deep block is held, and one layer's
    recomputation and backward pass; the layers below hold fewer inputs, the shallow blocks'
    fewer positions; tests/test_benchmark.py checks the two peaks agree), its time the
    first pass over the shallow blocks plus every layer of every block at the deep block's
    measured forward and backward time per layer (an upper figure: the shallow blocks have
    no text prefix). Returns {"estimated_seconds", "probe_seconds"}."""
    blocks = [b for b in model.blocks if not isinstance(b, IdentityBlock)]
    shallow, top = len(blocks) - 1, len(blocks[-1].attn_blocks)
    layers = sum(len(b.attn_blocks) for b in blocks)
    stamps = [time.perf_counter()]
    steps = model.denoise_steps(x, y)
    try:
        for done, _ in steps:
            stamps.append(time.perf_counter())
            if done == shallow + top + 1:
                break
    finally:
        steps.close()
    forward = (stamps[shallow + top] - stamps[shallow]) / top
    backward = stamps[shallow + top + 1] - stamps[shallow + top]
    first = stamps[shallow] - stamps[0]
    return {"estimated_seconds": first + layers * (forward + backward), "probe_seconds": stamps[-1] - stamps[0]}


def stage_denoise(run, whole: bool = True):
    """The step after sampling: the learned denoiser, or the score step (a gradient of
    the whole model's density); without `whole`, the score step's probe (denoise_probe)."""
    cfg, side = run.cfg, run.cfg.grid_size
    x = mx.random.normal((run.batch, side, side, cfg.in_channels), key=mx.random.key(run.args.seed + 5))
    y = run.y[: run.batch]
    with Stage(run.stages, "denoise") as info:
        if cfg.learnable_self_denoiser:
            run.time(lambda: mx.eval(run.model.learned_denoise(x, y)), info)
        elif not cfg.finetuned_vae:
            if whole:
                run.time(lambda: mx.eval(run.model.denoise(x, y)), info)
            else:
                info.update(denoise_probe(run.model, x, y), probed=True)
    return info


def compare_loop(run, tokens):
    """Seconds per token of the deep block's sequential loop with and without overlap
    and compile_step, measured in this run (tokens at both ends, as the deep stage)."""
    deep, z, rope, n_txt = _deep_inputs(run)
    out = {}
    for overlap in (False, True):
        for comp in (False, True):
            r = time_block_ends(
                deep,
                z,
                run.caches,
                n_txt,
                tokens,
                run.args.repeats,
                rope,
                None,
                run.args.guidance,
                overlap=overlap,
                compile_step=comp,
            )
            out[f"overlap={int(overlap)} compile={int(comp)}"] = r["per_token"]
    base = out["overlap=0 compile=0"]
    run.log(
        "  token loop, per token (speed-up against neither option): "
        + ", ".join(f"{k} {_duration(v)} ({base / v:.2f}x)" for k, v in out.items())
    )
    return out


# -- the plan: estimates from a first token ----------------------------------------------------------


def text_flops(run):
    """Multiply-adds x 2 of encoding the prompts: the text encoder's linears (T5 of the
    architecture's shapes, built lazily: nothing is allocated) over rows x tokens."""
    t5 = T5Encoder(T5Config(**ARCHS[run.args.arch]["t5"]))
    macs = sum(m.weight.size for _, m in t5.named_modules() if isinstance(m, nn.Linear))
    return 2 * macs * run.rows * run.cfg.txt_size


def plan(run):
    """Estimates of the long stages, before any of them runs: the deep and shallow blocks from
    tokens timed after a warm-up token (whole blocks or their ends, --tokens), the text encoding,
    the text prefix and denoising from the machine's and the model's measured matrix speed.
    {stage: decision}, printed before the first long stage."""
    a, lim = run.args, run.results["limits"]
    out = {}
    rate = lim["layer_many_GFLOPs"] * GB  # the flow's largest layer on many rows, as the model holds it
    if "text" in a.stages:
        same = a.text_dtype == a.dtype and not a.text_quantize and not a.quantize
        t_rate = lim["mlx_f32_matmul_GFLOPs"] * GB if a.text_dtype == "float32" and not a.text_quantize else None
        t_rate = rate if same else t_rate
        if t_rate:
            est = text_flops(run) / t_rate
            out["text"] = {"estimate": est, "run_estimate": est * (1 if est > AUTO_ONCE else a.warmup + a.repeats)}
    if "prefill" in a.stages:
        deep = sampled_blocks(run.model)[0]
        est = 2 * linear_params(deep) * run.rows * run.cfg.txt_size / rate
        runs = 1 if a.tokens == "auto" and est > AUTO_ONCE else a.repeats + 1
        out["prefill"] = {"estimate": est, "run_estimate": est * runs}
    if "deep" in a.stages:
        deep, z, rope, n_txt = _deep_inputs(run)
        first, warm = warm_token(deep, z, run.caches, n_txt, rope, None, a.guidance, **run.loop)
        out["deep_first_token"], out["deep_token"] = first, warm
        run.caches = None  # the stages allocate their own; two caches at once would raise their peaks
    shallow = sampled_blocks(run.model)[1]
    if "shallow" in a.stages and shallow:
        blocks, z, rope = _shallow_inputs(run)
        caches = blocks[-1].new_caches(run.batch, z.shape[1])
        out["shallow_first_token"], out["shallow_token"] = warm_token(blocks[-1], z, caches, 0, rope, **run.loop)
        del caches
    gc.collect()
    mx.clear_cache()
    N = run.cfg.num_tokens
    for name, n_blocks in (("deep", 1), ("shallow", len(shallow))):
        if f"{name}_token" not in out:
            continue
        whole_time = out[f"{name}_token"] * N * n_blocks
        whole = a.tokens == "all" or (a.tokens == "auto" and whole_time <= AUTO_BLOCK)
        timed = N if whole else min(N, 2 * (a.tokens_n + 1))
        out[name] = {
            "whole": whole,
            "estimate": whole_time,
            "run_estimate": out[f"{name}_token"] * timed * a.repeats * (n_blocks if whole else 1),
        }
    if "denoise" in a.stages and not run.cfg.learnable_self_denoiser and not run.cfg.finetuned_vae:
        est = denoise_flops(run) / rate
        run_it = a.tokens == "all" or est <= AUTO_DENOISE
        passes = 1 if a.tokens == "auto" and est > AUTO_ONCE else a.warmup + a.repeats
        blocks = [b for b in run.model.blocks if not isinstance(b, IdentityBlock)]
        layers = sum(len(b.attn_blocks) for b in blocks)
        probe = (len(blocks[-1].attn_blocks) + 1) / (2 * layers)  # the share of the step the probe runs
        out["denoise"] = {"estimate": est, "run": run_it, "run_estimate": est * (passes if run_it else probe)}
    return out


def log_plan(run, p):
    N = run.cfg.num_tokens
    lines, total = [], 0.0
    if "text" in p:
        total += p["text"]["run_estimate"]
        lines.append(f"  text encoding: about {_duration(p['text']['estimate'])} (from the matrix speed)")
    if "prefill" in p:
        total += p["prefill"]["run_estimate"]
        lines.append(
            f"  text prefix: about {_duration(p['prefill']['estimate'])} (from the largest layer's speed on many rows)"
        )
    for name, what in (("deep", "deep block"), ("shallow", "shallow blocks")):
        if name not in p:
            continue
        d = p[name]
        total += d["run_estimate"]
        per = (
            f"{_duration(p[f'{name}_token'])} per token after a warm-up token "
            f"({_duration(p[f'{name}_first_token'])}, set-up included)"
        )
        if d["whole"]:
            lines.append(f"  {what}: {per}: sampled whole ({N} tokens), {_times(run.args.repeats)}")
        else:
            lines.append(
                f"  {what}: {per}: whole, about {_duration(d['estimate'])}: timing "
                f"{run.args.tokens_n} tokens at each end and extrapolating (--tokens all runs it whole)"
            )
    if "denoise" in p:
        d = p["denoise"]
        total += d["run_estimate"]
        if d["run"]:
            lines.append(f"  denoising: about {_duration(d['estimate'])} per pass (from the largest layer's speed)")
        else:
            lines.append(
                f"  denoising: about {_duration(d['estimate'])} (from the largest layer's speed): run up to "
                "the deep block's top layer's backward pass (the step's peak), its time extrapolated "
                "(--tokens all runs it whole)"
            )
    if not lines:  # no long stage asked: nothing to plan
        return
    run.log(
        "plan, from tokens timed after a warm-up and the measured matrix speed (the VAE decode and the "
        "machine's probes not counted):\n"
        + "\n".join(lines)
        + f"\n  the rest of this benchmark: about {_duration(total)}"
    )


# -- the whole run ----------------------------------------------------------------------------


def run_order(stages):
    """The stages to run, in the pipeline's order: the flow and VAE loaded first, the text
    encoder beside them, then the decode and the sampling (timed after the plan)."""
    order = ("text", "vae", "prefill", "deep", "shallow", "denoise") + EXTRA_STAGES
    return ["load"] + [s for s in order if s in stages]


def run_benchmark(args, log=print):
    results = {"machine": machine.machine_info(), "args": vars(args).copy(), "stages": {}}
    cfg = read_config(args.model) if args.model else flow_config(args.arch)
    run = Run(args, cfg, log, results)
    stages = args.stages
    log(_header(results["machine"]))
    log(_intro(run))

    log("measuring the machine (memory copy, matrix multiply) ...")
    limits = {**machine.copy_speed(args.repeats), **machine.matmul_speed(args.repeats)}
    results["limits"] = limits
    if machine.reference_blas():  # said once, from what the process has loaded
        log(machine.blas_note("python -m mlx_starflow.benchmark ..."))
    elif limits["slow_blas"]:
        log("warning: " + machine.blas_advice("python -m mlx_starflow.benchmark ..."))

    steps = run_order(stages)
    k = len(steps)

    def begin(name, what):
        log(f"[{steps.index(name) + 1}/{k}] {what} ...")

    begin(
        "load",
        f"loading the flow from {args.model}"
        if args.model
        else f"building the flow: {_count(sum(v.size for _, v in tree_flatten(Flow(cfg).parameters())))} random "
        f"parameters, {_precision(args)}",
    )
    stage_load(run)
    log(_line("load", run.stages["load"]))
    if run.stages["load"]["unquantized"]:
        log(
            f"  left unquantized (input width not a multiple of {args.q_group_size}): "
            f"{', '.join(run.stages['load']['unquantized'])}"
        )
    deep, _ = sampled_blocks(run.model)
    limits.update(machine.layer_speed(largest_linear(deep), run.rows, args.repeats))
    limits["input_major"] = run.stages["load"]["input_major"]
    if limits["input_major"]:
        limits["layer"] += ", input-major"
    p = plan(run)  # before the first long stage
    results["plan"] = p
    log_plan(run, p)
    if "text" in stages:
        begin(
            "text",
            f"encoding {run.rows} prompts of {run.cfg.txt_size} tokens "
            f"(text encoder {args.text_dtype}{_q(args.text_quantize)}, beside the flow)",
        )
        stage_text(run)
        log(_line("text", run.stages["text"]))
        gc.collect()
        mx.clear_cache()
    if run.y is None:
        run.y = 0.1 * mx.random.normal((run.rows, run.cfg.txt_size, run.cfg.txt_dim), key=mx.random.key(args.seed))
    mx.eval(run.y)
    if "vae" in stages:
        begin("vae", f"decoding {run.batch} {run.image_side}x{run.image_side} image(s) with the VAE")
        stage_vae(run)
        log(_line("vae", run.stages["vae"]))
    if "prefill" in stages:
        begin("prefill", "feeding the text prefix through the deep block")
        stage_prefill(run)
        log(_line("prefill", run.stages["prefill"]))

    if "deep" in stages:
        begin("deep", "the deep block")
        stage_deep(run, p["deep"]["whole"])
        log(_line("deep", run.stages["deep"], limits))
    if args.compare_loop and "deep" in stages:
        results["loop"] = compare_loop(run, min(args.tokens_n, run.cfg.num_tokens))
    run.caches = None
    if "shallow" in p:
        begin("shallow", "the shallow blocks")
        stage_shallow(run, p["shallow"]["whole"])
        log(_line("shallow", run.stages["shallow"], limits))
    if "denoise" in stages:
        d = p.get("denoise")
        whole = d is None or d["run"]
        begin("denoise", "denoising" if whole else "denoising, up to the deep block's top layer's backward pass")
        stage_denoise(run, whole)
        log(_line("denoise", run.stages["denoise"]))
    if "score" in stages:
        begin("score", "scoring images: the exact likelihood, one density pass per image and prompt")
        st = results["stages"]["score"] = score_stage(
            run.model, run.y[: run.batch], repeats=args.repeats, warmup=args.warmup, seed=args.seed
        )
        log(
            f"  {st['images_per_second']:.3g} images per second (batches of {st['batch']}, "
            f"{_duration(st['seconds']['median'])} each); memory peak {_gb(st['peak_memory'])}"
        )
    if "invert" in stages:
        begin("invert", f"inverting {run.batch} image(s) with guidance {args.guidance:g}: editing's exact inversion")
        st = results["stages"]["invert"] = invert_stage(
            run.model, run.y, args.guidance, batch=run.batch, repeats=args.repeats, warmup=args.warmup, seed=args.seed
        )
        log(
            f"  {_duration(st['seconds']['median'])} per inversion ({st['tokens_per_second']:.3g} tokens per "
            f"second over {st['blocks']} blocks, no token loop); memory peak {_gb(st['peak_memory'])}"
        )
    run.vae = run.model = None
    gc.collect()
    mx.clear_cache()

    results["image"] = image_figures(run)
    if args.precision:
        log("precision (random weights, same seed and inputs; relative RMS difference to float32):")
        results["precision"] = study(
            args.precision_arch or ("tiny" if args.arch == "tiny" else "small"), args.q_group_size, args.seed, log
        )
    return results


FLOW_STAGES = ("prefill", "deep", "shallow", "denoise")


def whole_command_peaks(st) -> dict:
    """The peak of the whole `generate` run from the stages' measured peaks (each taken with the
    flow and the VAE resident, as a loaded Pipeline holds them):

    - resident (an app's Pipeline: flow and VAE loaded, the text encoder per call beside them):
      the largest stage peak as measured;
    - one-shot (the commands: the text encoder, then the flow, then the VAE, each alone): each
      stage's peak less the weights that stage would not have beside it (the text encoding
      without the flow and the VAE, the flow's stages without the VAE, the decode without the
      flow), the largest of them.

    Stages not run are not in either figure (`whole_peak_stages` names those that are)."""
    load = st.get("load", {})
    flow_w, vae_w = load.get("weight_bytes", 0), load.get("vae_weight_bytes", 0)
    less = {"text": flow_w + vae_w, "vae": flow_w, **{k: vae_w for k in FLOW_STAGES}}
    measured = {k: st[k]["peak_memory"] for k in less if k in st and "peak_memory" in st[k]}
    one_shot = {k: max(v - less[k], 0) for k, v in measured.items()}
    if not measured:
        return {"peak_one_shot": None, "peak_resident": None, "peak_one_shot_stage": None, "whole_peak_stages": []}
    top = max(one_shot, key=one_shot.get)
    return {
        "peak_one_shot": one_shot[top],
        "peak_one_shot_stage": top,
        "peak_resident": max(measured.values()),
        "whole_peak_stages": sorted(measured),
    }


def image_figures(run):
    """One image (or batch), from the stages run: seconds and peak memory, and what is
    extrapolated, estimated or missing."""
    st = run.stages
    parts = {}
    for k in ("text", "prefill", "denoise", "vae"):
        if k in st and "time" in st[k]:
            parts[k] = st[k]["time"]["median"]
    for k in ("deep", "shallow"):
        if k in st:
            parts[k] = st[k]["block_seconds"]
    if "denoise" in st and "estimated_seconds" in st["denoise"]:
        parts["denoise"] = st["denoise"]["estimated_seconds"]
    peaks = [
        st[k]["peak_memory"]
        for k in ("text", "prefill", "deep", "shallow", "denoise", "vae")
        if k in st and "peak_memory" in st[k]
    ]
    whole = whole_command_peaks(st)
    return {
        "side": run.image_side,
        "seconds": sum(parts.values()),
        "parts": parts,
        "peak_memory": max(peaks) if peaks else None,
        **whole,
        "extrapolated": [k for k in ("deep", "shallow") if k in st and st[k]["extrapolated"]],
        "estimated": ["denoise"] if "denoise" in st and "estimated_seconds" in st["denoise"] else [],
        "missing": [k for k in ("text", "prefill", "deep", "shallow", "denoise", "vae") if k not in st],
    }


def _intro(run):
    a = run.args
    source = f"the model in {a.model}" if a.model else f"random weights of the {a.arch} architecture"
    rows = f" (the deep block samples {run.rows} rows: conditional and unconditional)" if a.guidance > 0 else ""
    stages = ", ".join(run_order(a.stages))
    return (
        f"benchmark: {_what(a, run.rows, run.image_side)}{rows}, {a.sampler} sampling, {source}\n"
        f"  flow {_precision(a)}, text encoder {a.text_dtype}{_q(a.text_quantize)}, VAE {a.vae_dtype}; "
        f"stages: {stages} (--help for the options)"
    )


# -- the stages of what only a flow can do ------------------------------------------------


def score_stage(
    flow: Flow, y=None, *, batch_size: Optional[int] = None, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict:
    """The benchmark's `score` stage: the density pass as `score` runs it (batches of
    batch_size_for(flow) by default), on random inputs of the flow's own shape with
    one prompt's conditioning (the first row of y). The VAE encoding of latent models is
    not included. Returns the batch, seconds per batch (median, min, max),
    images per second and MLX's peak memory (weights included)."""
    cfg = flow.config
    bs = batch_size or batch_size_for(flow)
    side = cfg.input_size
    x = mx.random.normal((bs, side, side, cfg.in_channels), key=mx.random.key(seed))
    y = None if y is None else y[:1]
    mx.eval(x, *([] if y is None else [y]))
    mx.reset_peak_memory()
    ts = times(lambda: log_densities(flow, x, y, batch_size=bs), repeats, warmup)
    med = statistics.median(ts)
    return {
        "batch": bs,
        "seconds": {"median": med, "min": min(ts), "max": max(ts), "n": len(ts)},
        "images_per_second": bs / med,
        "peak_memory": mx.get_peak_memory(),
    }


def invert_stage(
    flow, y=None, guidance: float = 0.0, *, batch: int = 1, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> dict:
    """The benchmark's `invert` stage: the guided inversion `edit` runs (one parallel pass
    per block, no token loop) on random latents of the flow's own shape. y as
    sample.invert takes it for `batch` images (2 x batch rows [conditional; unconditional]
    when guidance > 0 for text models; class ids for TarFlow). The VAE encoding is not
    included. Returns the batch, tokens per image, blocks, seconds per call (median, min,
    max), tokens per second and MLX's peak memory (weights included)."""
    cfg = flow.config
    x = mx.random.normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels), key=mx.random.key(seed))
    mx.eval(x, *([] if y is None else [y]))
    mx.reset_peak_memory()
    ts = times(lambda: mx.eval(flow_invert(flow, x, y, guidance)), repeats, warmup)
    med = statistics.median(ts)
    h, w = flow.grid(x)
    return {
        "batch": batch,
        "tokens": h * w,
        "blocks": len(sampling_order(flow)),
        "seconds": {"median": med, "min": min(ts), "max": max(ts), "n": len(ts)},
        "tokens_per_second": batch * h * w / med,
        "peak_memory": mx.get_peak_memory(),
    }
