"""The precision study: how far each component's output moves, in each supported
precision, from float32 on the same random weights, seed and inputs.

    python -m mlx_starflow.precision --arch small

Random weights are not trained ones: the figures give the order of the error each
precision adds and how it compounds through the guided autoregressive sampling,
not the visual effect on a real image (BENCHMARKS.md, Precision policy).
"""

import argparse
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..images import write_json
from ..loading import device, quant
from ..loading.quant import quant_args, quantize_linear
from ..loading.weights import quantize_model
from ..models.flow import Flow
from ..models.vae import VAE
from ..sample import sample
from .random_models import ARCHS, flow_config, random_flow, random_t5, random_vae

# name, weight dtype, bits. Quantized from bf16 weights, the scales are bf16 too;
# from float32 they stay float32.
FLOW_VARIANTS = (
    ("bfloat16", mx.bfloat16, None),
    ("float16", mx.float16, None),
    ("8-bit", mx.bfloat16, 8),
    ("4-bit", mx.bfloat16, 4),
    ("8-bit, fp32 scales", mx.float32, 8),
    ("4-bit, fp32 scales", mx.float32, 4),
)
T5_VARIANTS = (("bfloat16", mx.bfloat16, None), ("8-bit", mx.float32, 8), ("4-bit", mx.float32, 4))


def relative_error(a, b) -> float:
    """Relative RMS difference of a to the reference b."""
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def variant(model, dtype, bits=None, group_size=64):
    """A copy of `model`'s float32 weights in `dtype`, quantized to `bits` by the
    same rule as its loader (the flow's transformer linears; T5's linears)."""
    new = VAE(model.config) if isinstance(model, VAE) else type(model)(model.config)
    if isinstance(new, VAE):
        new.encoder = None
    new.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    if bits:
        if isinstance(new, Flow):
            quantize_model(new, bits=bits, group_size=group_size)
        else:
            quantize_linear(new, **quant_args({"bits": bits, "group_size": group_size}))
    device.prepare(new)  # the model as the pipeline runs it on this device
    mx.eval(new.parameters())
    return new


def study(arch="small", group_size=64, seed=0, log=print):
    """Each component (flow: a guided sample and a density pass; T5: embeddings; VAE:
    a decoded image) in each precision against float32. Returns {component: {name: error}}."""
    out = {"arch": arch, "flow": {}, "t5": {}, "vae": {}}
    cfg = flow_config(arch)
    k1, k2, k3 = mx.random.split(mx.random.key(seed + 1), 3)
    side = cfg.grid_size

    t5 = random_t5(arch, mx.float32, seed=seed)
    ids = mx.random.randint(0, t5.config.vocab_size, (2, cfg.txt_size), key=k1)
    ref_y = t5(ids)
    mx.eval(ref_y)
    for name, dt, bits in T5_VARIANTS:
        out["t5"][name] = relative_error(variant(t5, dt, bits, group_size)(ids), ref_y)
    del t5
    log("  t5:   " + ", ".join(f"{k} {v:.2e}" for k, v in out["t5"].items()))

    flow, _ = random_flow(cfg, mx.float32, seed=seed)
    y = 0.5 * ref_y.astype(mx.float32)
    noise = mx.random.normal((1, side, side, cfg.in_channels), key=k2)
    ref_x = sample(flow, noise, y, guidance=2.0)
    ref_z, _ = flow(ref_x, y[:1])
    mx.eval(ref_x, ref_z)
    for name, dt, bits in FLOW_VARIANTS:
        m = variant(flow, dt, bits, group_size)
        out["flow"][name] = {
            "sample": relative_error(sample(m, noise, y, guidance=2.0), ref_x),
            "forward": relative_error(m(ref_x, y[:1])[0], ref_z),
        }
    del flow, m
    log(
        "  flow: "
        + ", ".join(f"{k} sample {v['sample']:.2e} / forward {v['forward']:.2e}" for k, v in out["flow"].items())
    )

    vae = random_vae(arch, mx.float32, seed=seed)
    lat = mx.random.normal((1, side, side, vae.config.latent_channels), key=k3)
    out["vae"]["bfloat16"] = relative_error(variant(vae, mx.bfloat16).decode(lat), vae.decode(lat))
    log("  vae:  " + ", ".join(f"{k} {v:.2e}" for k, v in out["vae"].items()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_starflow.tools.precision",
        description="Each component's precisions against float32, on random weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--arch",
        default="small",
        choices=list(ARCHS),
        help="architecture of the random model (float32 must be affordable: 3b is 15 GB)",
    )
    p.add_argument(
        "--q-group-size",
        type=int,
        default=quant.DEFAULT_GROUP_SIZE,
        choices=quant.GROUP_SIZES,
        help="quantization group size",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    print(f"relative RMS difference to float32 ({args.arch} architecture, random weights):")
    out = study(args.arch, args.q_group_size, args.seed)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
