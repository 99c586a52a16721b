"""The 8-bit KV cache against the float cache: how far the sample moves, and the memory saved.

    python -m mlx_starflow.tools.kv_cache --arch small

Random weights of an architecture (random_models.py), the same noise and text rows, guided
sampling (sequential, and Jacobi with its rewinds) with the deep block's cache in the flow's
dtype and at 8 bits; the relative RMS difference of the samples, the cache's bytes and the
peak MLX memory of each run. The 3B's cache sizes are computed from its shapes.
"""

import argparse
import time

import mlx.core as mx

from ..models.cache import make_cache
from ..sample import Jacobi, sample
from .random_models import flow_config, random_flow

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def rel(a, b) -> float:
    return float(mx.sqrt(mx.mean(mx.square(a - b)) / mx.mean(mx.square(b))))


def cache_bytes(cfg, rows: int, dtype, bits=None) -> int:
    """The deep block's cache for `rows` rows (2: one guided image), from its shapes."""
    positions = (cfg.txt_size or 0) + cfg.num_tokens
    one = make_cache(rows, cfg.top_num_kv_heads, positions, cfg.head_dim, dtype, bits).nbytes
    return one * int(cfg.layers_per_block[-1])


def study(arch="small", dtype="float32", guidance=3.6, seed=0, log=print) -> dict:
    cfg = flow_config(arch)
    flow, _ = random_flow(cfg, DTYPES[dtype], seed=seed)
    cfg = flow.config
    noise = mx.random.normal((1, cfg.input_size, cfg.input_size, cfg.in_channels), key=mx.random.key(seed + 1))
    y = 0.5 * mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(seed + 2))
    out = {"arch": arch, "dtype": dtype, "guidance": guidance}
    f32 = random_flow(cfg, mx.float32, seed=seed)[0] if dtype != "float32" else None
    for name, jac in (("sequential", None), ("jacobi", Jacobi(16, 1e-4, 32))):
        runs = {}
        for bits in (None, 8):
            mx.eval(flow.parameters())
            mx.reset_peak_memory()
            t = time.perf_counter()
            x = sample(flow, noise, y, guidance, jacobi=jac, kv_bits=bits)
            mx.eval(x)
            runs[bits] = (x, mx.get_peak_memory(), time.perf_counter() - t)
        out[name] = {
            "relative_rms": rel(runs[8][0], runs[None][0]),
            "peak_float": runs[None][1],
            "peak_8bit": runs[8][1],
            "seconds_float": runs[None][2],
            "seconds_8bit": runs[8][2],
        }
        if f32 is not None:  # both against the float32 flow: the dtype's own error for scale
            ref = sample(f32, noise, y, guidance, jacobi=jac)
            out[name]["float_vs_float32"] = rel(runs[None][0], ref)
            out[name]["8bit_vs_float32"] = rel(runs[8][0], ref)
            log(
                f"{arch} {name}: against the float32 flow, {dtype} with its float cache {rel(runs[None][0], ref):.1e}, "
                f"with the 8-bit cache {rel(runs[8][0], ref):.1e}"
            )
        log(
            f"{arch} {dtype} {name}: 8-bit cache moves the sample by {out[name]['relative_rms']:.1e} (relative RMS); "
            f"peak {runs[None][1] / 1e6:.1f} MB -> {runs[8][1] / 1e6:.1f} MB; "
            f"{runs[None][2]:.2f} s -> {runs[8][2]:.2f} s"
        )
    out["cache_float"] = cache_bytes(cfg, 2, DTYPES[dtype])
    out["cache_8bit"] = cache_bytes(cfg, 2, DTYPES[dtype], 8)
    log(
        f"{arch} deep-block cache, one guided image: {out['cache_float'] / 1e6:.1f} MB -> "
        f"{out['cache_8bit'] / 1e6:.1f} MB"
    )
    big = flow_config("3b")
    for dt in ("float32", "bfloat16"):
        f, q = cache_bytes(big, 2, DTYPES[dt]), cache_bytes(big, 2, DTYPES[dt], 8)
        out[f"3b_cache_{dt}"] = (f, q)
        log(f"3b deep-block cache, one guided image, {dt} activations: {f / 1e9:.2f} GB -> {q / 1e9:.2f} GB at 8 bits")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small", choices=["tiny", "small"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--cfg", type=float, default=3.6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    study(a.arch, a.dtype, a.cfg, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
