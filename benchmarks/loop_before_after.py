"""The token loop before and after a change, timed in one process: a checkout of
the old code (a `git worktree`) is imported beside this one, both sample the same
random weights of a small architecture, interleaved run by run so that other work
on the machine slows both alike. Prints the median wall times and the
ratios new / old (above 1: slower) of the median wall times, of the fastest runs
and of the median CPU times of the process, and the largest difference between
the two samples (they must agree).

    git worktree add /tmp/old fef1bc4        # the flat layout, before the restructuring
    python benchmarks/loop_before_after.py /tmp/old --arch small --repeats 5

The old code is driven through what it had: sample.block_steps and sample.sample where it
has a sample module (fef1bc4 on), else FlowBlock._sample_sequential and Flow.sample (220f8fa);
the new through sample.block_steps and sample.sample. Each side's model is prepared as its
own loader did on this device (flow.input_major, or device.prepare).
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_starflow.loading import device  # noqa: E402
from mlx_starflow.sample import Jacobi, block_steps, sample  # noqa: E402
from mlx_starflow.tools.random_models import ARCHS, flow_config, random_flow  # noqa: E402


def import_old(checkout: Path):
    """The package of another checkout, imported as `mlx_starflow_old`."""
    init = checkout / "mlx_starflow" / "__init__.py"
    if not init.is_file():
        sys.exit(f"{checkout} has no mlx_starflow/__init__.py: pass the root of a checkout (git worktree add ...)")
    spec = importlib.util.spec_from_file_location(
        "mlx_starflow_old", init, submodule_search_locations=[str(init.parent)]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["mlx_starflow_old"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def models(old_pkg, arch, seed):
    """The same random float32 weights in the new and the old Flow, each prepared for this device."""
    old_config, old_flow = old_pkg.config, old_pkg.flow
    new, _ = random_flow(flow_config(arch), mx.float32, seed=seed)
    a = ARCHS[arch]
    old = old_flow.Flow(old_config.starflow_config_from_args(a["flow"], txt_dim=a["txt_dim"]))
    old.load_weights(tree_flatten(new.parameters()), strict=True)
    mx.eval(old.parameters())
    old_device = sys.modules.get("mlx_starflow_old.device")
    if old_device is not None:
        old_device.prepare(old)
    elif device.on_cpu():
        old_flow.input_major(old)
    device.prepare(new)
    return new, old


def deep_block(flow, y, seed):
    """The deep block's inputs: text prefix in caches, noise for every token (both guidance halves)."""
    cfg, block = flow.config, flow.blocks[-1]
    side, n_txt = cfg.grid_size, cfg.txt_size
    rope = flow.rope(True, side, side, n_txt)
    caches = block.new_caches(y.shape[0], n_txt + cfg.num_tokens)
    block.prefill(y, rope, caches)
    z = mx.random.normal((1, cfg.num_tokens, cfg.token_dim), key=mx.random.key(seed))
    return block, mx.concatenate([z, z]), caches, rope, n_txt


def timed(fn):
    """Wall time, this process's CPU time (all threads: less disturbed by other work on
    the machine than the wall time), and fn's result."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    mx.eval(out)
    return time.perf_counter() - t, time.process_time() - c, out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python benchmarks/loop_before_after.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("old", type=Path, help="root of the old checkout (git worktree add /tmp/old <commit>)")
    p.add_argument("--arch", default="small", choices=list(ARCHS), help="random-weight architecture")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each case (medians reported)")
    p.add_argument("--cfg", type=float, default=3.6, help="guidance weight")
    p.add_argument("--cases", default="deep,sequential,jacobi", help="which of deep,sequential,jacobi to time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not chosen or set(chosen) - {"deep", "sequential", "jacobi"}:
        p.error("--cases: choose from deep,sequential,jacobi")

    old_pkg = import_old(args.old.resolve())
    old_flow = old_pkg.flow

    new, old = models(old_pkg, args.arch, args.seed)
    cfg = new.config
    side = cfg.grid_size
    y = 0.5 * mx.random.normal((2, cfg.txt_size, cfg.txt_dim), key=mx.random.key(args.seed + 1))
    noise = mx.random.normal((1, side, side, cfg.in_channels), key=mx.random.key(args.seed + 2))
    g = args.cfg
    nb, nz, ncaches, nrope, n_txt = deep_block(new, y, args.seed + 3)
    ob, oz, ocaches, orope, _ = deep_block(old, y, args.seed + 3)

    def run_steps(steps_fn, block, z, caches, rope):
        for c in caches:
            c.offset = n_txt
        steps = steps_fn(block, z, caches, rope, None, g)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    old_sample = sys.modules.get("mlx_starflow_old.sample")  # the module (the package's `sample` is the function)

    def new_deep():
        return run_steps(block_steps, nb, nz, ncaches, nrope)

    def old_deep():
        if old_sample is not None:
            return run_steps(old_sample.block_steps, ob, oz, ocaches, orope)
        for c in ocaches:
            c.offset = n_txt
        return ob._sample_sequential(oz, ocaches, orope, None, g, None)

    def old_whole(jacobi=None):
        if old_sample is not None:
            return old_sample.sample(old, noise, y, g, jacobi=jacobi and old_sample.Jacobi())
        return old.sample(noise, y, g, jacobi=jacobi and old_flow.Jacobi())

    cases = {
        "deep": ("deep block, per token", new_deep, old_deep, cfg.num_tokens),
        "sequential": ("sequential sample", lambda: sample(new, noise, y, g), old_whole, 1),
        "jacobi": ("Jacobi sample", lambda: sample(new, noise, y, g, jacobi=Jacobi()), lambda: old_whole(True), 1),
    }

    print(
        f"{args.arch} architecture ({cfg.num_tokens} tokens per block, width {cfg.top_channels}), float32, "
        f"guidance {g:g}, {args.repeats} runs each, old: {args.old}"
    )
    print(f"{'case':24s} {'old':>10s} {'new':>10s} {'new/old':>8s} {'fastest':>8s} {'cpu time':>9s}  max |new - old|")
    results = {}
    for name, new_fn, old_fn, per in (cases[c] for c in chosen):
        timed(new_fn), timed(old_fn)  # warm-up
        tn, to, cn, co = [], [], [], []
        for _ in range(args.repeats):  # interleaved: the machine's other work slows both alike
            t, c, xn = timed(new_fn)
            tn.append(t / per)
            cn.append(c)
            t, c, xo = timed(old_fn)
            to.append(t / per)
            co.append(c)
        mn, mo = statistics.median(tn), statistics.median(to)
        ratios = {
            "ratio": mn / mo,
            "fastest_ratio": min(tn) / min(to),
            "cpu_ratio": statistics.median(cn) / statistics.median(co),
        }
        diff = float(np.max(np.abs(np.array(xn) - np.array(xo))))
        unit, scale = ("ms", 1e3) if per > 1 else ("s", 1.0)
        print(
            f"{name:24s} {mo * scale:8.2f}{unit:>2s} {mn * scale:8.2f}{unit:>2s} {ratios['ratio']:8.3f} "
            f"{ratios['fastest_ratio']:8.3f} {ratios['cpu_ratio']:9.3f}  {diff:.1e}"
        )
        results[name] = {"old": mo, "new": mn, **ratios, "max_abs_diff": diff}
    return results


if __name__ == "__main__":
    main()
