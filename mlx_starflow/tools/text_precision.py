"""Does the text encoder's precision matter beside the flow's? The precision study's method
(tools/precision.py: random weights, the same seed and inputs, relative RMS difference to
float32) applied to the pair: for each flow precision, each text-encoder precision's prompt
embeddings and the final image (the guided sample decoded by a float32 VAE) against the
all-float32 run.

    python -m mlx_starflow.tools.text_precision --arch small

The text encoder follows the flow (precision_policy.text_follows) where its own error stays
well under the flow's: then a smaller text encoder costs the image nothing it has not
already lost to the flow's precision, and its memory is the command's peak no longer.
"""

import argparse
import sys

import mlx.core as mx

from ..images import write_json
from ..sample import sample
from .precision import relative_error, variant
from .random_models import ARCHS, flow_config, random_flow, random_t5, random_vae

# name, weight dtype, bits (quantized from bf16 for the flow, from float32 for T5, as the loaders do)
FLOWS = (
    ("float32", mx.float32, None),
    ("bfloat16", mx.bfloat16, None),
    ("8-bit", mx.bfloat16, 8),
    ("4-bit", mx.bfloat16, 4),
)
TEXTS = (
    ("float32", mx.float32, None),
    ("bfloat16", mx.bfloat16, None),
    ("8-bit", mx.float32, 8),
    ("4-bit", mx.float32, 4),
)


def study(arch="small", seed=0, guidance=2.0, log=print) -> dict:
    """{"embeddings": {text: error}, "image": {flow: {text: error}}} against all-float32."""
    cfg = flow_config(arch)
    k1, k2 = mx.random.split(mx.random.key(seed + 1), 2)
    side = cfg.grid_size
    t5 = random_t5(arch, mx.float32, seed=seed)
    ids = mx.random.randint(0, t5.config.vocab_size, (2, cfg.txt_size), key=k1)  # [prompt; negative]
    embeddings = {}
    for name, dt, bits in TEXTS:
        m = t5 if name == "float32" else variant(t5, dt, bits)
        embeddings[name] = 0.5 * m(ids).astype(mx.float32)  # the study's scale for random weights
        mx.eval(embeddings[name])
    del t5, m
    out = {"arch": arch, "guidance": guidance, "embeddings": {}, "image": {}}
    for name in embeddings:
        out["embeddings"][name] = relative_error(embeddings[name], embeddings["float32"])
    log("  embeddings: " + ", ".join(f"T5 {k} {v:.2e}" for k, v in out["embeddings"].items()))

    vae = random_vae(arch, mx.float32, seed=seed)
    flow, _ = random_flow(cfg, mx.float32, seed=seed)
    noise = mx.random.normal((1, side, side, cfg.in_channels), key=k2)

    def image(model, y):
        x = sample(model, noise, y, guidance=guidance)
        img = vae.decode(x)
        mx.eval(img)
        return img

    ref = image(flow, embeddings["float32"])
    for fname, dt, bits in FLOWS:
        m = flow if fname == "float32" else variant(flow, dt, bits)
        row = {}
        for tname in embeddings:
            row[tname] = relative_error(image(m, embeddings[tname]), ref)
        out["image"][fname] = row
        log(f"  image, flow {fname:>8}: " + ", ".join(f"T5 {k} {v:.2e}" for k, v in row.items()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_starflow.tools.text_precision",
        description="The text encoder's precision beside the flow's, against float32, on random weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", default="small", choices=list(ARCHS), help="architecture of the random models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    print(f"relative RMS difference to all-float32 ({args.arch} architecture, random weights):")
    out = study(args.arch, args.seed)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
