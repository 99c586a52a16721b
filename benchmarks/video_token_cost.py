"""What one deep-block token of STARFlow-V costs, and why: one layer at the 7B's shapes (width 4096,
64 heads, guidance: 2 rows), timed in one process through

- the video sampler itself (video_sample.sample_video_steps) over the first tokens of a clip;
- its token loop (sample.block_points, compile_step=False, as video_sample runs it) with the KV cache of
  the whole clip (256 text + 21 x 1,590 positions) holding P positions, for P from the first frame's to
  the last frame's;
- the image sampler's loop (sample.block_steps, compile_step as images sample) over an image deep block
  of the 3B's layout made as wide (the very same layer object), at the image's positions (128 text +
  1,024 tokens);
- the layer's parts alone: its four linears on 2 rows (weights read once a token), and attention
  (mx.fast.scaled_dot_product_attention) over P cached positions;

and the copy speed of numpy and of MLX in the same run. Random weights, float32, prepared for the
device as the pipelines load them (device.prepare). Runs are interleaved, `--repeats` times, medians
printed with every run. One layer and one cache of the whole clip: about 3.5 GB.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/video_token_cost.py --repeats 3
"""

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_starflow.loading import device  # noqa: E402
from mlx_starflow.models.flow import FlowBlock  # noqa: E402
from mlx_starflow.models.rope import rope_table  # noqa: E402
from mlx_starflow.models.video import VideoFlow  # noqa: E402
from mlx_starflow.sample import block_steps  # noqa: E402
from mlx_starflow.tools.random_models import flow_config, randomize  # noqa: E402
from mlx_starflow.tools.video_benchmark import arch_config  # noqa: E402
from mlx_starflow.video_sample import sample_video_steps  # noqa: E402

ROWS, WIDTH, TEXT, FRAME, LATENT = 2, 4096, 256, 1590, 21
GUIDANCE = 3.5


def median_time(fn, n=5):
    fn()
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def loop_per_token(block, z, caches, P, rope, compile_step, tokens):
    """Seconds a token of the block's loop with P positions in the cache, after one untimed token."""
    for c in caches:
        c.offset = P
    steps = block_steps(block, z, caches, rope, None, GUIDANCE, compile_step=compile_step, compile_min_tokens=1)
    stamps = []
    for done in steps:
        stamps.append(time.perf_counter())
        if done >= tokens + 1:
            break
    steps.close()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def attention_alone(cache, q, P):
    """Seconds of attention over the cache's first P + 1 positions. The slices live only here: a view
    of the cache's buffer held on would keep the next token's in-place write from reusing it (MLX
    copies a buffer still referenced elsewhere: the whole cache, once)."""
    k, v = cache.keys[:, :, : P + 1], cache.values[:, :, : P + 1]
    return median_time(lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=6, help="tokens timed a run")
    args = p.parse_args(argv)
    cfg, video = arch_config("7b", 1)
    cfg = replace(cfg, layers_per_block=[0, 0, 0, 0, 0, 1], learnable_self_denoiser=False)
    flow = device.prepare(randomize(VideoFlow(cfg, video), mx.float32, 0))
    mx.eval(flow.parameters())
    vb = flow.blocks[-1]
    layer = vb.attn_blocks[0]
    W = sum(v.nbytes for _, v in tree_flatten(layer.parameters()))
    icfg = replace(
        flow_config("3b"), top_channels=WIDTH, top_num_heads=64, top_num_kv_heads=64, layers_per_block=[2] * 5 + [0]
    )
    ib = randomize(FlowBlock(icfg, 5), mx.float32, 1)
    mx.eval(ib.parameters())
    ib.attn_blocks = vb.attn_blocks  # the same layer
    res = {}

    def add(k, v):
        res.setdefault(k, []).append(v)

    # the video sampler itself: tokens 2.. of a clip (P = 256 text + the tokens before); a clip of 2
    # latent frames, so that its cache and the one below are not both held (a token's cost depends on
    # the positions attended to, not on those allocated)
    y = 0.5 * mx.random.normal((ROWS, TEXT, cfg.txt_dim))
    noise = mx.random.normal((1, 2, 30, 53, 48))
    mx.eval(y, noise)
    for _ in range(args.repeats):
        steps = sample_video_steps(flow, noise, y, GUIDANCE)
        stamps = []
        for _step in steps:
            stamps.append(time.perf_counter())
            if len(stamps) >= args.tokens + 2:
                break
        steps.close()
        del steps, _step
        gc.collect()
        mx.clear_cache()
        add(
            "video sampler (sample_video_steps), first tokens of the clip, P=258",
            (stamps[-1] - stamps[1]) / (len(stamps) - 2),
        )

    positions = TEXT + LATENT * FRAME
    vcaches = vb.new_caches(ROWS, positions)
    mx.eval([c.state for c in vcaches])
    vrope = flow.rope(30, 53, LATENT, TEXT)
    zv = mx.random.normal((ROWS, FRAME, 48))
    icaches = ib.new_caches(ROWS, 128 + 1024)
    irope = rope_table(64, 32, 32, 128, True, 32)
    zi = mx.random.normal((ROWS, 1024, 4))
    x = mx.random.normal((ROWS, 1, WIDTH))
    q = mx.random.normal((ROWS, 64, 1, 64))
    mx.eval(zv, zi, x, q, [c.state for c in icaches])
    n_copy = 2**26  # 256 MB
    a, na = mx.ones((n_copy,)), np.ones(n_copy, dtype=np.float32)
    mx.eval(a)
    lins = [layer.attention.qkv, layer.attention.proj, layer.mlp.main[0], layer.mlp.main[2]]
    at = [TEXT + 2, 128 + 1024, TEXT + FRAME, TEXT + 5 * FRAME, TEXT + 10 * FRAME, positions - 8]
    for r in range(args.repeats):
        add("numpy copy, GB/s (read + write)", 2 * a.nbytes / median_time(lambda: na.copy(), 3) / 1e9)
        add("MLX copy, GB/s (read + write)", 2 * a.nbytes / median_time(lambda: mx.eval(a + 0), 3) / 1e9)
        add(
            "the layer's linears alone (2 rows)",
            median_time(lambda: mx.eval(lins[0](x), lins[1](x), lins[3](lins[2](x)))),
        )
        for P in (130, 1100):
            add(
                f"image loop, compile_step=True (as images sample), P={P}",
                loop_per_token(ib, zi, icaches, P - 128, irope, True, args.tokens),
            )
        for P in at:
            add(
                f"video loop (compile_step=False, as video_sample), P={P}",
                loop_per_token(vb, zv, vcaches, P, vrope, False, args.tokens),
            )
            add(f"attention alone over the cache, P={P}", attention_alone(vcaches[0], q, P))
        print(f"run {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(
        f"one layer: {W / 1e9:.3f} GB of weights, {ROWS * W / 4 / 1e6:.0f} M multiply-adds a token; "
        f"the cache: {2 * ROWS * WIDTH * 4 / 1e6:.4f} MB a position (keys and values, 2 rows)"
    )
    for k, v in res.items():
        rate = "GB/s" in k
        med = statistics.median(v)
        print(
            f"{k}: {med:.1f}" if rate else f"{k}: {med * 1e3:.1f} ms",
            "  runs:",
            ", ".join(f"{t:.1f}" if rate else f"{t * 1e3:.0f}" for t in v),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
