"""`python -m mlx_starflow.benchmark`: time and memory of every stage of STARFlow
text-to-image, on the released 3B architecture, next to the machine's limits.

Without --model the weights are random, of exactly the released shapes, created
layer by layer directly in the target dtype or quantization (the machine never
holds a float32 copy of the model). Every figure is a median over --repeats runs
after a warm-up; the deep and shallow blocks can be timed over --tokens tokens at
the start and at the end of the sequence and extrapolated, so a slow machine can
still measure the 3B model.

    python -m mlx_starflow.benchmark --dtype bfloat16 --tokens 8
    python -m mlx_starflow.benchmark --quantize 4 --stages deep,shallow --json out.json
    python -m mlx_starflow.benchmark --model path/to/converted --dtype bfloat16
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import RELEASED, starflow_config_from_args
from .flow import Flow, FlowBlock, IdentityBlock, Jacobi, input_major
from .quant import QuantizedLinear, quantize_linear
from .t5 import T5Config, T5Encoder
from .vae import VAE, VAEConfig
from .weights import DTYPES, load_flow, read_config

STAGES = ("text", "load", "prefill", "deep", "shallow", "denoise", "vae")
GB = 1e9

# Architectures: the released 3B model with its T5-XL encoder and SD-VAE, a small
# one for the precision comparison (float32 is cheap there), a tiny one for tests.
ARCHS = {
    "3b": {
        "flow": RELEASED["starflow_3B_t2i_256x256"], "txt_dim": 2048,
        "t5": dict(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
                   feed_forward_proj="gated-gelu"),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    },
    "small": {
        "flow": {**RELEASED["starflow_3B_t2i_256x256"], "img_size": 128, "txt_size": 16, "channels": 256,
                 "layers_per_block": "1 1 1 1 1 4"},
        "txt_dim": 256,
        "t5": dict(vocab_size=1000, d_model=256, d_kv=64, num_heads=4, d_ff=640, num_layers=4,
                   feed_forward_proj="gated-gelu"),
        "vae": dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, norm_num_groups=32),
    },
    "tiny": {
        "flow": {**RELEASED["starflow_3B_t2i_256x256"], "img_size": 64, "txt_size": 8, "channels": 128,
                 "blocks": 3, "layers_per_block": "1 1 2"},
        "txt_dim": 64,
        "t5": dict(vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                   feed_forward_proj="gated-gelu"),
        "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8),
    },
}

# Debian/Ubuntu's libopenblas0-pthread puts a drop-in libblas here.
OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libblas.so.3"


def flow_config(arch):
    a = ARCHS[arch]
    return starflow_config_from_args(a["flow"], txt_dim=a["txt_dim"])


def flow_spec(arch="3b"):
    """{name: shape} of every parameter of the architecture, without allocating
    anything (MLX arrays are lazy until evaluated)."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Flow(flow_config(arch)).parameters())}


# -- random models, built in place ---------------------------------------------------


def _cast(module, dtype):
    module.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                           module.parameters()))


def _randomize(module, dtype, rng, keep=None):
    """Uniform weights of the initialisers' scale (+-1/sqrt(fan in)), drawn with
    numpy (several times faster than MLX's generator on a CPU), in `dtype`; norms
    keep their initial values. One tensor at a time is ever in float32."""

    def fill(path, p):
        if (keep and keep in f".{path}") or not mx.issubdtype(p.dtype, mx.floating):
            return p
        if path.endswith("norm.weight") or path.endswith("norm.bias"):
            return p.astype(dtype)
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 64
        a = rng.random(p.shape, dtype=np.float32)
        a -= 0.5
        a *= 2 / np.sqrt(fan_in)
        return mx.array(a).astype(dtype)

    flat = [(k, fill(k, v)) for k, v in tree_flatten(module.parameters())]
    module.update(tree_unflatten(flat))


def _quantize_linears(module, bits, group_size, path, skipped):
    """Quantize the linears of one transformer layer (as weights.quantize_model does)."""
    skipped.extend(f"{path}.{p}" for p in quantize_linear(module, bits, group_size))


def random_flow(cfg, dtype=mx.float32, quantize=None, seed=0):
    """A Flow with random weights in `dtype`, its transformer linears quantized
    ({"bits", "group_size"}) as each layer is made. Returns (model, unquantized paths)."""
    rng = np.random.default_rng(seed)
    model = Flow(cfg)  # lazy: its initialisers never run, every tensor is replaced below
    skipped = []
    for i, block in enumerate(model.blocks):
        if isinstance(block, IdentityBlock):
            continue
        for j, layer in enumerate(block.attn_blocks):
            _randomize(layer, dtype, rng)
            if quantize:
                _quantize_linears(layer, quantize["bits"], quantize["group_size"],
                                  f"blocks.{i}.attn_blocks.{j}", skipped)
            mx.eval(layer.parameters())
    _randomize(model, dtype, rng, keep=".attn_blocks.")  # the rest: projections, norms, embeddings
    mx.eval(model.parameters())
    if quantize:
        cfg.quantization = dict(quantize)
    return model, skipped


def random_t5(arch, dtype=mx.float32, bits=None, group_size=64, seed=0):
    rng = np.random.default_rng(seed)
    model = T5Encoder(T5Config(**ARCHS[arch]["t5"]))
    for block in model.blocks:
        _randomize(block, dtype, rng)
        if bits:
            quantize_linear(block, bits=bits, group_size=group_size)
        mx.eval(block.parameters())
    _randomize(model, dtype, rng, keep="blocks.")  # as load_t5: embeddings and norms stay unquantized
    mx.eval(model.parameters())
    return model


def random_vae(arch, dtype=mx.float32, seed=0):
    vae = VAE(VAEConfig(**ARCHS[arch]["vae"]))
    vae.encoder = None  # decoding only
    _randomize(vae, dtype, np.random.default_rng(seed))
    mx.eval(vae.parameters())
    return vae


# -- measuring ---------------------------------------------------------------------------


def peak_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def summary(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


class Stage:
    """Peak MLX memory and wall times of one stage."""

    def __init__(self, results, name):
        self.results, self.name = results, name
        self.info = {}

    def __enter__(self):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        self.resident = mx.get_active_memory()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.info.update(resident_before=self.resident, peak_memory=mx.get_peak_memory(),
                             peak_rss=peak_rss())
            self.results[self.name] = self.info

    def time(self, fn, repeats, warmup=1):
        self.info["time"] = summary(_times(fn, repeats, warmup))
        return self.info["time"]


def _times(fn, repeats, warmup=1, budget=float("inf")):
    """Wall times of `repeats` calls after `warmup` calls, stopping once over budget seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if sum(times) > budget:
            break
    return times


def _median_time(fn, repeats=3, budget=5.0):
    return statistics.median(_times(fn, repeats, budget=budget))


def machine_limits(step_shape, dtype, quantize, repeats=3, in_out=False):
    """Copy bandwidth (MLX and numpy), matmul throughput at the model's shapes (in
    the model's weight layout), and whether MLX's float32 matmul is far below
    numpy's (a reference BLAS)."""
    out = {}
    n = 64 * 1024 * 1024  # 256 MB of float32, far above any cache
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    out["mlx_copy_GBps"] = 2 * a.nbytes / _median_time(lambda: mx.eval(a * 1.0), repeats) / GB
    del a
    b = np.random.default_rng(0).random(n, dtype=np.float32)
    c = np.empty_like(b)
    out["numpy_copy_GBps"] = 2 * b.nbytes / _median_time(lambda: np.copyto(c, b), repeats) / GB
    del b, c
    out["copy_GBps"] = max(out["mlx_copy_GBps"], out["numpy_copy_GBps"])

    s = 1024
    x = mx.random.normal((s, s))
    mx.eval(x)
    out["mlx_f32_matmul_GFLOPs"] = 2 * s**3 / _median_time(lambda: mx.eval(x @ x), repeats) / GB
    xn = np.random.default_rng(0).standard_normal((s, s), dtype=np.float32)
    out["numpy_f32_matmul_GFLOPs"] = 2 * s**3 / _median_time(lambda: xn @ xn, repeats) / GB
    out["slow_blas"] = out["mlx_f32_matmul_GFLOPs"] < 0.25 * out["numpy_f32_matmul_GFLOPs"]

    # The deep block's widest linear (width -> 4 x width), in the model's precision:
    # many rows (compute bound, as the text prefix and the denoiser) and the step's rows.
    rows, width = step_shape
    w = mx.random.normal((4 * width, width)).astype(dtype)
    if in_out:
        w = mx.contiguous(w.T).T  # stored (in, out), as flow.input_major leaves it
    fast = mx.default_device() == mx.gpu or dtype == mx.float32
    m = 256 if fast and not quantize else 32
    if quantize:  # as the model computes it (quant.QuantizedLinear)
        layer = nn.Linear(width, 4 * width, bias=False)
        layer.weight = w
        linear = QuantizedLinear.from_linear(layer, quantize["group_size"], quantize["bits"])
        weights = [linear.weight, linear.scales, linear.biases]
    else:
        weights = [w]

        def linear(inp):
            return inp @ w.T

    weight_bytes = sum(t.nbytes for t in weights)
    mx.eval(*weights)
    for name, r in (("peak", m), ("step", rows)):
        inp = mx.random.normal((r, width)).astype(dtype)
        mx.eval(inp)
        dt = _median_time(lambda: mx.eval(linear(inp)), repeats, budget=20.0)
        out[f"matmul_{name}_rows"] = r
        out[f"matmul_{name}_GFLOPs"] = 2 * r * w.size / dt / GB
        out[f"matmul_{name}_GBps"] = weight_bytes / dt / GB
    out["in_out"] = in_out
    return out


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    info = {"os": platform.platform(), "python": platform.python_version(), "machine": platform.machine(),
            "device": str(mx.default_device()),
            "versions": {p: _version(p) for p in ("mlx", "mlx-lm", "numpy")},
            "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")}
    chip = platform.processor()
    try:
        if sys.platform == "darwin":
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True).stdout.strip() or chip
        else:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["chip"] = chip
    if hasattr(os, "getloadavg"):  # other work on the machine skews every timing
        info["load_average"] = os.getloadavg()
    info["cpus"] = os.cpu_count()
    try:
        info["memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        info["memory"] = None
    if mx.metal.is_available():
        d = mx.metal.device_info()
        info["chip"] = d.get("device_name", info["chip"])
        info["memory"] = d.get("memory_size", info["memory"])
    return info


def blas_advice():
    if sys.platform == "darwin":
        return "MLX's float32 matmul is far below numpy's: check that MLX uses Accelerate (pip install -U mlx)."
    install = "" if Path(OPENBLAS).exists() else "sudo apt-get install libopenblas0-pthread, then "
    return ("MLX's float32 matmul is far below numpy's: MLX's Linux CPU wheel links the reference BLAS.\n"
            f"  Fix: {install}run with (also for generate)\n"
            f"  LD_PRELOAD={OPENBLAS} python -m mlx_starflow.benchmark ...\n"
            "  Intel's MKL streams the token loop's weights ~1.5x faster still (README, Linux).")


# -- the stages ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _token_times(run, n):
    """Run a sampling loop, stopping after n tokens; the time of each token."""
    stamps = [time.perf_counter()]

    def progress(done, total):
        stamps.append(time.perf_counter())
        if len(stamps) > n:
            raise _Stop

    try:
        run(progress)
    except _Stop:
        pass
    return np.diff(stamps)


def time_block(block, z, rope, cond, guidance, caches, n_txt, tokens, repeats, jacobi=None):
    """Per-token times of `tokens` tokens sampled at the start and at the end of the
    sequence (the cache's contents do not change the cost, only its length)."""
    N = z.shape[1]
    tokens = min(tokens, N)
    out = {}
    for where, start in (("start", 0), ("end", N - tokens)):
        def run(progress, start=start):
            for c in caches:
                c.offset = n_txt + start
            if jacobi is None:
                block._sample_sequential(z[:, :tokens], caches, rope, cond, guidance, progress)
            else:
                block._sample_jacobi(z[:, :tokens], caches, rope, cond, guidance, jacobi, progress)

        _token_times(run, 1)  # warm-up
        per, runs = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            d = _token_times(run, tokens)
            runs.append(time.perf_counter() - t)
            per.extend(d.tolist() if jacobi is None else [runs[-1] / tokens])
        out[f"per_token_{where}"] = summary(per)
        out[f"run_{where}"] = summary(runs)
    for c in caches:
        c.offset = n_txt
    out["tokens_timed"] = tokens
    out["per_token"] = (out["per_token_start"]["median"] + out["per_token_end"]["median"]) / 2
    # Cost is affine in the position (weights fixed, attention linear): the mean of
    # the two ends times the tokens.
    out["extrapolated"] = out["per_token"] * N
    return out


def block_weight_bytes(block):
    """Bytes of weights read per sampled token (proj_txt only serves the prefix)."""
    return sum(v.nbytes for k, v in tree_flatten(block.parameters()) if not k.startswith("proj_txt"))


def block_flops_per_token(block, batch, n_txt, N):
    params = sum(v.size for k, v in tree_flatten(block.parameters())
                 if k.startswith("attn_blocks") and k.endswith(("weight", "weight_t")) and v.ndim == 2)
    if any(isinstance(m, nn.QuantizedLinear) for _, m in block.named_modules()):
        params = sum(m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
                     for _, m in block.named_modules() if isinstance(m, nn.QuantizedLinear))
    attn = block.attn_blocks[0].attention
    ctx = n_txt + N / 2  # the average length attended to
    return batch * (2 * params + 4 * len(block.attn_blocks) * attn.heads * attn.head_dim * ctx)


def run_benchmark(args, log=print):
    dtype = DTYPES[args.dtype]
    quant = {"bits": args.quantize, "group_size": args.q_group_size} if args.quantize else None
    stages = set(args.stages)
    results = {"machine": machine_info(), "args": vars(args), "stages": {}}
    st = results["stages"]
    cfg = read_config(args.model) if args.model else flow_config(args.arch)
    B = args.batch
    guided = args.cfg > 0
    B2 = 2 * B if guided else B
    n_txt, N = cfg.txt_size, cfg.num_tokens
    side = cfg.grid_size
    rng = mx.random.key(args.seed)
    k_text, k_noise, k_x = mx.random.split(rng, 3)

    log(_header(results["machine"]))

    # Text first, and freed before the flow is built: the two never share memory.
    y = None
    if "text" in stages:
        tdtype = DTYPES[args.text_dtype]
        with Stage(st, "text") as s:
            t = time.perf_counter()
            t5 = random_t5(args.arch, tdtype, args.text_quantize, args.q_group_size)
            s.info["build"] = time.perf_counter() - t
            s.info["weight_bytes"] = sum(v.nbytes for _, v in tree_flatten(t5.parameters()))
            ids = mx.random.randint(0, t5.config.vocab_size, (B2, n_txt), key=k_text)
            mask = mx.concatenate([mx.ones((B2, n_txt // 2), mx.int32), mx.zeros((B2, n_txt - n_txt // 2), mx.int32)],
                                  axis=1)

            def encode():
                h = t5(ids, mask)
                out = h * mask[..., None].astype(h.dtype)
                mx.eval(out)
                return out

            s.time(encode, args.repeats, args.warmup)
            y = encode().astype(mx.float32)
            del t5
        if y.shape[-1] != cfg.txt_dim:
            y = None
        gc.collect()
        mx.clear_cache()
        log(_line("text", st["text"]))
    if y is None:
        y = 0.1 * mx.random.normal((B2, n_txt, cfg.txt_dim), key=k_text)
    mx.eval(y)

    with Stage(st, "load") as s:
        t = time.perf_counter()
        if args.model:
            model = load_flow(args.model, dtype=args.dtype if args.model_dtype else None, quantize=quant)
            unquantized = []
        else:
            model, unquantized = random_flow(cfg, dtype, quant, seed=args.seed)
        s.info["time"] = summary([time.perf_counter() - t])
        params = tree_flatten(model.parameters())
        s.info["parameters"] = sum(v.size for _, v in params)
        s.info["weight_bytes"] = sum(v.nbytes for _, v in params)
        del params  # input_major below frees each weight as it goes: no other reference
        s.info["unquantized"] = unquantized
        # input_major changes float32 linears only: quantized and bf16 models keep their layout.
        on_cpu = mx.default_device() == mx.cpu
        n = input_major(model) if args.layout == "in-out" or (args.layout == "auto" and on_cpu) else 0
        if n:
            s.info["input_major_linears"] = n
        in_out = n > 0
    cfg = model.config
    log(_line("load", st["load"]))
    if unquantized:
        log(f"  left unquantized (input width not a multiple of {args.q_group_size}): {', '.join(unquantized)}")

    vae = None
    if "vae" in stages:  # resident beside the flow, as in a pipeline
        vae = random_vae(args.arch, DTYPES[args.vae_dtype], seed=args.seed)

    deep = model.blocks[-1]
    rope = model.rope(True, side, side, n_txt)
    z = mx.random.normal((B, N, cfg.token_dim), key=k_noise)
    z2 = mx.concatenate([z, z]) if guided else z
    text = y if guided else y[:B]
    jacobi = Jacobi() if args.sampler == "jacobi" else None
    tokens = min(args.tokens or N, N)
    full = tokens >= N

    results["limits"] = machine_limits((B2, cfg.top_channels), deep.proj_in.weight.dtype,
                                       cfg.quantization or quant, args.repeats, in_out)
    log(_limits_text(results["limits"]))

    caches = None
    if {"prefill", "deep"} & stages:
        with Stage(st, "deep") as s:
            caches = deep.new_caches(B2, n_txt + N)
            s.info["kv_cache_bytes"] = sum(c.nbytes for c in caches)
            if "prefill" in stages:
                st["prefill"] = {"time": _prefill_time(deep, text, rope, caches, args.repeats)}
            else:  # the prefix contents do not change the cost of a token
                for c in caches:
                    c.offset = n_txt
            if "deep" in stages:
                if full:
                    s.info.update(_full_block(deep, z2, rope, guided, args.cfg, text, jacobi, args.repeats))
                else:
                    s.info.update(time_block(deep, z2, rope, None, args.cfg if guided else 0.0, caches, n_txt,
                                             tokens, args.repeats, jacobi))
                wb = block_weight_bytes(deep)
                s.info["weight_bytes_per_token"] = wb
                s.info["GBps"] = wb / s.info["per_token"] / GB
                s.info["fraction_of_copy_bandwidth"] = s.info["GBps"] / results["limits"]["copy_GBps"]
                s.info["GFLOPs"] = block_flops_per_token(deep, B2, n_txt, N) / s.info["per_token"] / GB
                s.info["fraction_of_matmul_peak"] = s.info["GFLOPs"] / results["limits"]["matmul_peak_GFLOPs"]
        if "prefill" in stages:
            st["prefill"].update(peak_memory=st["deep"]["peak_memory"], peak_rss=st["deep"]["peak_rss"])
            log(_line("prefill", st["prefill"]))
        if "deep" not in stages:
            del st["deep"]
        else:
            log(_line("deep", st["deep"]))
        del caches

    if args.compare_loop and "deep" in stages:
        results["loop"] = compare_loop(deep, z2, rope, args.cfg if guided else 0.0, B2, n_txt, N,
                                       min(args.tokens or 16, N), args.repeats, log)

    shallow = [b for b in model.blocks[:-1] if not isinstance(b, IdentityBlock)]
    if "shallow" in stages and shallow:
        with Stage(st, "shallow") as s:
            block = shallow[-1]
            rope0 = model.rope(False, side, side, 0)
            if full:
                x = z
                times = []
                for b in reversed(shallow):
                    t = time.perf_counter()
                    x = b.sample(x, rope0, None, None, 0.0, jacobi)
                    mx.eval(x)
                    times.append(time.perf_counter() - t)
                s.info["per_block"] = summary(times)
                s.info["per_token"] = statistics.median(times) / N
                s.info["extrapolated"] = sum(times)
            else:
                caches = block.new_caches(B, N)
                s.info.update(time_block(block, z, rope0, None, 0.0, caches, 0, tokens, args.repeats, jacobi))
                s.info["extrapolated"] *= len(shallow)
                del caches
            s.info["blocks"] = len(shallow)
            s.info["weight_bytes_per_token"] = block_weight_bytes(block)
            s.info["GBps"] = s.info["weight_bytes_per_token"] / s.info["per_token"] / GB
        log(_line("shallow", st["shallow"]))

    if "denoise" in stages:
        x = mx.random.normal((B, side, side, cfg.in_channels), key=k_x)
        with Stage(st, "denoise") as s:
            if cfg.learnable_self_denoiser:
                s.time(lambda: mx.eval(model.learned_denoise(x, y[:B])), args.repeats, args.warmup)
            elif not cfg.finetuned_vae:
                s.time(lambda: mx.eval(model.denoise(x, y[:B])), args.repeats, args.warmup)
        log(_line("denoise", st["denoise"]))

    if vae is not None:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        lat = mx.random.normal((B, side, side, vae.config.latent_channels), key=k_x) / vae.config.scaling_factor
        with Stage(st, "vae") as s:
            s.time(lambda: mx.eval(vae.decode(lat, tile=args.vae_tile)), args.repeats, args.warmup)
            s.info["image"] = [side * f, side * f]
        log(_line("vae", st["vae"]))
        del vae

    sampling = [st[k]["peak_memory"] for k in ("prefill", "deep", "shallow", "denoise", "vae") if k in st]
    if sampling:
        results["sampling_peak_memory"] = max(sampling)
    _totals(results, full)
    del model
    gc.collect()
    mx.clear_cache()

    if args.precision:
        log("precision (random weights, same seed and inputs; relative RMS difference to float32):")
        results["precision"] = precision_report(args.precision_arch or ("tiny" if args.arch == "tiny" else "small"),
                                                args.q_group_size, args.seed, log)
    return results


def compare_loop(block, z, rope, guidance, batch, n_txt, N, tokens, repeats, log=print):
    """Per-token time of the sequential loop with and without overlap and compile,
    measured in this run (tokens at both ends, as the deep stage)."""
    default = (FlowBlock.overlap, FlowBlock.compile_step)
    caches = block.new_caches(batch, n_txt + N)
    out = {}
    try:
        for overlap in (False, True):
            for comp in (False, True):
                FlowBlock.overlap, FlowBlock.compile_step = overlap, comp
                r = time_block(block, z, rope, None, guidance, caches, n_txt, tokens, repeats)
                out[f"overlap={int(overlap)} compile={int(comp)}"] = r["per_token"]
    finally:
        FlowBlock.overlap, FlowBlock.compile_step = default
    base = out["overlap=0 compile=0"]
    log("token loop (ms/token, ratio to neither): " +
        ", ".join(f"{k} {v * 1e3:.2f} ({base / v:.2f}x)" for k, v in out.items()))
    return out


def _prefill_time(block, text, rope, caches, repeats):
    times = []
    for i in range(repeats + 1):
        for c in caches:
            c.offset = 0
        t = time.perf_counter()
        block.prefill(text, rope, caches)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t)
    return summary(times)


def _full_block(block, z, rope, guided, w, text, jacobi, repeats):
    """The real block.sample over the whole sequence (prefix included)."""
    times, per = [], []
    for i in range(repeats + 1):
        stamps = [time.perf_counter()]
        block.sample(z, rope, text, None, w if guided else 0.0, jacobi,
                     lambda done, total: stamps.append(time.perf_counter()))
        if i:
            times.append(stamps[-1] - stamps[0])
            per.extend(np.diff(stamps[1:]).tolist())
    N = z.shape[1]
    med = statistics.median(times)
    return {"run": summary(times), "per_token": med / N, "per_token_steps": summary(per) if per else None,
            "tokens_timed": N, "extrapolated": med}


def _totals(results, full):
    st = results["stages"]
    total = sum(st[k]["time"]["median"] for k in ("text", "prefill", "denoise", "vae") if k in st)
    total += sum(st[k]["extrapolated"] for k in ("deep", "shallow") if k in st)
    results["image_time"] = total
    results["image_time_extrapolated"] = not full


# -- precision -----------------------------------------------------------------------------


def _rel(a, b):
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def _variant(model, dtype, quantize):
    """A copy of `model`'s float32 weights in another precision."""
    new = type(model)(model.config) if not isinstance(model, VAE) else VAE(model.config)
    if isinstance(new, VAE):
        new.encoder = None
    new.update(tree_map(lambda p: p, model.parameters()))
    _cast(new, dtype)
    if quantize:
        if isinstance(new, Flow):
            from .weights import quantize_model
            quantize_model(new, **quantize)
        else:
            quantize_linear(new, bits=quantize["bits"], group_size=quantize["group_size"])
    mx.eval(new.parameters())
    return new


def precision_report(arch, group_size, seed, log=print):
    """Each component's output in each supported precision against float32, on one
    architecture small enough for float32 to be cheap."""
    out = {"arch": arch, "flow": {}, "t5": {}, "vae": {}}
    cfg = flow_config(arch)
    key = mx.random.key(seed + 1)
    k1, k2, k3 = mx.random.split(key, 3)
    side = cfg.grid_size

    t5 = random_t5(arch, mx.float32, seed=seed)
    ids = mx.random.randint(0, t5.config.vocab_size, (2, cfg.txt_size), key=k1)
    ref_y = t5(ids)
    mx.eval(ref_y)
    for name, dt, q in (("bfloat16", mx.bfloat16, None), ("8-bit", mx.float32, 8), ("4-bit", mx.float32, 4)):
        m = _variant(t5, dt, {"bits": q, "group_size": group_size} if q else None)
        out["t5"][name] = _rel(m(ids), ref_y)
    del t5, m
    log("  t5:   " + ", ".join(f"{k} {v:.2e}" for k, v in out["t5"].items()))

    flow, _ = random_flow(cfg, mx.float32, seed=seed)
    y = 0.5 * ref_y.astype(mx.float32)
    noise = mx.random.normal((1, side, side, cfg.in_channels), key=k2)
    ref_x = flow.sample(noise, y, guidance=2.0)
    ref_z, _ = flow(ref_x, y[:1])
    mx.eval(ref_x, ref_z)
    # Quantized from bf16 weights, scales and biases are bf16 too; from float32 they stay float32.
    variants = (("bfloat16", mx.bfloat16, None), ("float16", mx.float16, None), ("8-bit", mx.bfloat16, 8),
                ("4-bit", mx.bfloat16, 4), ("8-bit, fp32 scales", mx.float32, 8),
                ("4-bit, fp32 scales", mx.float32, 4))
    for name, dt, q in variants:
        m = _variant(flow, dt, {"bits": q, "group_size": group_size} if q else None)
        x = m.sample(noise, y, guidance=2.0)
        zz, _ = m(ref_x, y[:1])
        out["flow"][name] = {"sample": _rel(x, ref_x), "forward": _rel(zz, ref_z)}
    del flow, m
    log("  flow: " + ", ".join(f"{k} sample {v['sample']:.2e} / forward {v['forward']:.2e}"
                               for k, v in out["flow"].items()))

    vae = random_vae(arch, mx.float32, seed=seed)
    lat = mx.random.normal((1, side, side, 4), key=k3)
    ref = vae.decode(lat)
    for name, dt in (("bfloat16", mx.bfloat16),):
        m = _variant(vae, dt, None)
        out["vae"][name] = _rel(m.decode(lat), ref)
    log("  vae:  " + ", ".join(f"{k} {v:.2e}" for k, v in out["vae"].items()))
    return out


# -- printing ----------------------------------------------------------------------------------


def _gb(n):
    return f"{n / GB:.2f} GB"


def _header(m):
    mem = _gb(m["memory"]) if m["memory"] else "?"
    v = ", ".join(f"{k} {x}" for k, x in m["versions"].items())
    pre = f", LD_PRELOAD={m['LD_PRELOAD']}" if m["LD_PRELOAD"] else ""
    load = f", load average {m['load_average'][0]:.1f}" if "load_average" in m else ""
    return f"{m['chip']} ({m['cpus']} cpus, {mem}{load}), {m['os']}, {m['device']}\n{v}{pre}"


def _limits_text(lim):
    s = (f"machine: copy {lim['copy_GBps']:.1f} GB/s (mlx {lim['mlx_copy_GBps']:.1f}, numpy "
         f"{lim['numpy_copy_GBps']:.1f}); float32 matmul mlx {lim['mlx_f32_matmul_GFLOPs']:.1f} vs numpy "
         f"{lim['numpy_f32_matmul_GFLOPs']:.1f} GFLOP/s\n"
         f"model's linear: {lim['matmul_peak_GFLOPs']:.1f} GFLOP/s at {lim['matmul_peak_rows']} rows, "
         f"{lim['matmul_step_GBps']:.1f} GB/s of weights at {lim['matmul_step_rows']} rows (the step)"
         f"{', weights (in, out)' if lim.get('in_out') else ''}")
    if lim["slow_blas"]:
        s += "\nwarning: " + blas_advice()
    return s


def _line(name, info):
    parts = [f"{name:8s}"]
    if "time" in info:
        t = info["time"]
        parts.append(f"{t['median']:.3f} s (min {t['min']:.3f}, max {t['max']:.3f}, n {t['n']})")
    if "per_token" in info:
        parts.append(f"{info['per_token'] * 1e3:.1f} ms/token")
        if "per_token_start" in info:
            parts.append(f"(start {info['per_token_start']['median'] * 1e3:.1f}, "
                         f"end {info['per_token_end']['median'] * 1e3:.1f}, {info['tokens_timed']} tokens timed)")
        parts.append(f"-> {info['extrapolated']:.1f} s")
    if "GBps" in info:
        parts.append(f"{_gb(info['weight_bytes_per_token'])}/token, {info['GBps']:.1f} GB/s")
    if "fraction_of_copy_bandwidth" in info:
        parts.append(f"({100 * info['fraction_of_copy_bandwidth']:.0f}% of copy), {info['GFLOPs']:.1f} GFLOP/s "
                     f"({100 * info['fraction_of_matmul_peak']:.0f}% of matmul)")
    if "weight_bytes" in info:
        parts.append(f"weights {_gb(info['weight_bytes'])}")
    if "peak_memory" in info:
        parts.append(f"peak {_gb(info['peak_memory'])}, rss {_gb(info['peak_rss'])}")
    return " ".join(parts)


def print_summary(results, log=print):
    if "load_average" in results["machine"]:
        load = os.getloadavg()[0]
        busy = " (above the cpu count: other work skews the timings)" if load > (os.cpu_count() or 1) else ""
        log(f"load average at the end: {load:.1f}{busy}")
    if "sampling_peak_memory" in results:
        log(f"peak MLX memory while sampling: {_gb(results['sampling_peak_memory'])}")
    est = " (extrapolated)" if results["image_time_extrapolated"] else ""
    log(f"time for the stages run: {results['image_time']:.1f} s{est}")


def parser():
    p = argparse.ArgumentParser(description="Time and memory of STARFlow text-to-image, stage by stage.")
    p.add_argument("--model", help="a converted model folder (default: random weights of the released shapes)")
    p.add_argument("--arch", default="3b", choices=list(ARCHS), help="architecture of the random model")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="flow weights")
    p.add_argument("--model-dtype", action="store_true", help="with --model: cast its weights to --dtype")
    p.add_argument("--quantize", type=int, choices=[4, 8], help="quantize the flow's transformer linears")
    p.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    p.add_argument("--text-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--text-quantize", type=int, choices=[4, 8])
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vae-tile", type=int, help="tiled VAE decode with this tile (latents)")
    p.add_argument("--batch", type=int, default=1, help="images")
    p.add_argument("--cfg", type=float, default=2.5, help="guidance weight (0: no guidance, half the batch)")
    p.add_argument("--sampler", default="sequential", choices=["sequential", "jacobi"])
    p.add_argument("--tokens", type=int, help="time this many tokens at each end of a block and extrapolate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs of the text, denoise and VAE stages first (0: a slow stage measured once)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated, from {','.join(STAGES)} (load always runs)")
    p.add_argument("--layout", default="auto", choices=["auto", "out-in", "in-out"],
                   help="flow linears' weight layout; auto: (in, out) for float32 on the CPU (flow.input_major)")
    p.add_argument("--compare-loop", action="store_true",
                   help="time the deep block's token loop with and without overlap and mx.compile")
    p.add_argument("--precision", action="store_true",
                   help="also compare each component's precisions with float32 on a small architecture")
    p.add_argument("--precision-arch", choices=list(ARCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = sorted(set(args.stages) - set(STAGES))
    if bad:
        parser().error(f"unknown stages {bad}; choose from {','.join(STAGES)}")
    if args.repeats < 1 or args.warmup < 0:
        parser().error("--repeats must be at least 1 and --warmup at least 0")
    if args.model and not Path(args.model).is_dir():
        parser().error(f"{args.model} is not a folder")
    results = run_benchmark(args)
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
