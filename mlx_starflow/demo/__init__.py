"""The demo model: a small class-conditional STARFlow trained on procedural shapes.

It is a toy that ships inside the package (this subpackage: the training and
evaluation here, its data set in shapes.py, its weights in model/) so that the engine
can make a picture offline in seconds; it is not Apple's text-to-image model.
The prompt is one of the twelve classes of `shapes.PROMPTS` ("red circle", ...),
embedded as a one-hot text prefix of one token, with an extra unconditional
one-hot row for classifier-free guidance. Training uses the same `Flow` code as
inference and its exact log-likelihood as the loss.

MLX's Linux wheel uses the reference BLAS; train with OpenBLAS preloaded (about
10-25x faster float32 matmuls on a 2-core CPU, README). The shipped weights come from this
one command (about 45 minutes here; docs/demo.md has the times and the measured
quality):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=1 \\
        python -m mlx_starflow.demo train --out /tmp/demo/run --force

    python -m mlx_starflow.demo evaluate            # checker accuracy, held-out bits/dim
    python -m mlx_starflow.demo grid --out docs/demo_grid.png

Bits per dimension. Training images x in [-1, 1] (8-bit u as u / 127.5 - 1) are
noise-augmented, x~ = x + noise_std * eps, and the loss is -log p(x~) / D in nats
(D = 32*32*3). Reported bits/dim are of x~ in 8-bit pixel units: the density of
u~ = 127.5 * (x~ + 1) is p(x~) / 127.5^D, so

    bpd = -log p(x~) / (D ln 2) + log2(127.5).

This is the likelihood of the Gaussian-noised image (noise_std * 127.5 levels of
noise), comparable across runs of this demo, not a bound on the discrete 8-bit
likelihood.
"""

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..loading.hub import DEMO as DEMO_DIR
from ..loading.weights import load_flow, save_model
from ..models.config import FlowConfig
from ..models.flow import Flow
from ..pipeline import ClassEncoder
from ..sample import Jacobi
from ..sample import sample as flow_sample
from . import shapes

LOG2_SCALE = math.log2(127.5)  # [-1, 1] -> 8-bit levels, per dimension
HELD_OUT_SEED = 1_000_003  # held-out images for bits/dim: never a training seed
SELECT_SEED = 2_000_003  # noise for choosing the sampling defaults
EVAL_SEED = 3_000_017  # noise for the reported checker accuracy
JACOBI = Jacobi(block_size=16, threshold=1e-3, max_iter=32)


def demo_config(
    channels=128, head_dim=64, layers=(1, 1, 1, 4), expansion=2, noise_std=0.1, top_channels=None
) -> FlowConfig:
    """Pixel-space STARFlow for 32x32 RGB: 4x4 patches (64 tokens of 48), RoPE,
    SOS, softplus scales, deep-shallow blocks with the class on the top block."""
    n = len(shapes.PROMPTS)
    top = top_channels or channels
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=3,
        input_size=32,
        patch_size=4,
        channels=channels,
        top_channels=top,
        head_dim=head_dim,
        num_heads=channels // head_dim,
        num_kv_heads=channels // head_dim,
        top_num_heads=top // head_dim,
        top_num_kv_heads=top // head_dim,
        layers_per_block=list(layers),
        expansion=expansion,
        rope=True,
        pt_seq_len=8,
        sos=True,
        seq_order="L2R",
        use_softplus=True,
        cond_top_only=True,
        txt_size=1,
        txt_dim=n + 1,
        noise_std=noise_std,
        class_names=list(shapes.PROMPTS),
        image_size=32,
    )
    cfg.validate()
    return cfg


def class_text(labels, cfg: FlowConfig) -> mx.array:
    """One-hot text prefix (B, 1, classes + 1); label `len(class_names)` is unconditional."""
    return ClassEncoder.for_config(cfg).rows(labels)


def bpd_8bit(nats_per_dim):
    """Bits/dim of 8-bit images from nats/dim of the [-1, 1] density (see module doc)."""
    return nats_per_dim / math.log(2) + LOG2_SCALE


def init_for_training(model: Flow):
    """The reference's initial state: output projections at zero (each block starts
    as the identity) and small random SOS embeddings."""
    for block in model.blocks:
        if "proj_out" not in block:
            continue
        block.proj_out.weight = mx.zeros_like(block.proj_out.weight)
        block.proj_out.bias = mx.zeros_like(block.proj_out.bias)
        if "sos_embed" in block:
            block.sos_embed = 0.02 * mx.random.normal(block.sos_embed.shape)
    mx.eval(model.parameters())


def train(
    cfg: FlowConfig,
    steps=5200,
    batch_size=32,
    lr=7e-4,
    warmup=300,
    min_lr_ratio=0.02,
    weight_decay=1e-4,
    label_drop=0.1,
    grad_clip=1.0,
    seed=0,
    log_every=100,
    log=print,
    init: Optional[Flow] = None,
):
    """Train a Flow on freshly drawn shapes, from scratch or continuing `init`;
    returns (model, losses in nats/dim).

    Every batch is new data (make_dataset with seeds from one generator), so the
    run is reproducible from `seed` and cannot overfit a fixed set."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    if init is None:
        model = Flow(cfg)
        init_for_training(model)
    else:
        model = init
    warm = min(warmup, max(steps - 1, 1))
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), optim.cosine_decay(lr, max(steps - warm, 1), lr * min_lr_ratio)],
        [warm],
    )
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=weight_decay)
    n_cls = len(cfg.class_names)
    D = cfg.in_channels * cfg.input_size**2

    def loss_fn(x, y):
        return -model.log_prob(x, y).mean() / D

    # The random state is an input and output of the compiled function, so the
    # noise and label dropout advance on every call instead of being baked in;
    # the model is an output too, as value_and_grad writes its parameters.
    @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
    def gradients(images, labels):
        x = images + cfg.noise_std * mx.random.normal(images.shape)
        drop = mx.random.uniform(shape=labels.shape) < label_drop
        y = class_text(mx.where(drop, n_cls, labels), cfg)
        loss, grads = nn.value_and_grad(model, loss_fn)(x, y)
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
        return loss, grads, norm

    opt.init(model.trainable_parameters())  # the state must exist before compile captures it
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        opt.update(model, grads)

    losses, skipped, tic, seen = [], 0, time.perf_counter(), 0
    for i in range(steps):
        images, labels = shapes.make_dataset(batch_size, int(rng.integers(2**31)))
        loss, grads, norm = gradients(mx.array(shapes.to_model(images)), mx.array(labels.astype(np.int32)))
        mx.eval(loss, grads, norm)
        loss = loss.item()
        # A rare batch can overflow (a tiny predicted scale meets an outlier): skip
        # its update, as the reference's grad_skip does, instead of poisoning Adam.
        if not (math.isfinite(loss) and math.isfinite(norm.item())):
            skipped += 1
            if skipped > max(10, steps // 50):
                raise FloatingPointError(f"{skipped} non-finite steps by step {i + 1}; lower the learning rate")
            continue
        update(grads)
        mx.eval(state)
        losses.append(loss)
        seen += batch_size
        if log and ((i + 1) % log_every == 0 or i == steps - 1):
            avg = float(np.mean(losses[-log_every:]))
            dt = time.perf_counter() - tic
            log(
                f"step {i + 1}/{steps}  loss {avg:.4f} nats/dim  {bpd_8bit(avg):.3f} bits/dim  "
                f"grad norm {norm.item():.2f}  lr {opt.learning_rate.item():.2e}  skipped {skipped}  "
                f"{seen / dt:.0f} img/s  {dt / 60:.1f} min"
            )
    return model, losses


# -- sampling and evaluation ---------------------------------------------------


def sample(
    model: Flow, labels, guidance=2.0, sampler="sequential", denoise="score", seed=0, batch_size=96
) -> np.ndarray:
    """uint8 images (N, 32, 32, 3) of the given class indices, in batches."""
    cfg = model.config
    if sampler not in ("sequential", "jacobi"):
        raise ValueError(f"sampler must be 'sequential' or 'jacobi', not {sampler!r}")
    if denoise not in ("score", "none"):
        raise ValueError(f"denoise must be 'score' or 'none', not {denoise!r}")
    labels = np.asarray(labels, dtype=np.int32)
    key = mx.random.key(seed)
    s, c = cfg.input_size, cfg.in_channels
    noise = mx.random.normal((len(labels), s, s, c), key=key)
    uncond = len(cfg.class_names)
    out = []
    for i in range(0, len(labels), batch_size):
        lab = mx.array(labels[i : i + batch_size])
        y = class_text(lab, cfg)
        y_all = mx.concatenate([y, class_text(mx.full(lab.shape, uncond), cfg)]) if guidance > 0 else y
        x = flow_sample(
            model, noise[i : i + batch_size], y_all, guidance=guidance, jacobi=JACOBI if sampler == "jacobi" else None
        )
        if denoise == "score":
            x = model.denoise(x, y)
        mx.eval(x)
        out.append(shapes.from_model(x))
    return np.concatenate(out)


def checker_accuracy(model: Flow, per_class=16, seed=EVAL_SEED, **kwargs) -> dict:
    """Sample `per_class` images of every class and run the shape checker."""
    labels = np.repeat(np.arange(len(model.config.class_names)), per_class)
    images = sample(model, labels, seed=seed, **kwargs)
    result = shapes.evaluate(images, labels)
    result["images"] = images
    return result


def held_out_bpd(model: Flow, n=1200, seed=HELD_OUT_SEED, batch_size=100) -> float:
    """Bits/dim (8-bit units) of freshly drawn, noise-augmented images of every class."""
    cfg = model.config
    images, labels = shapes.make_dataset(n, seed)
    keys = mx.random.split(mx.random.key(seed), -(-n // batch_size))
    D = cfg.in_channels * cfg.input_size**2
    total = 0.0
    for k, i in enumerate(range(0, n, batch_size)):
        x = mx.array(shapes.to_model(images[i : i + batch_size]))
        x = x + cfg.noise_std * mx.random.normal(x.shape, key=keys[k])
        y = class_text(mx.array(labels[i : i + batch_size].astype(np.int32)), cfg)
        total += (-model.log_prob(x, y)).sum().item()
    return bpd_8bit(total / (n * D))


def select_sampling(
    model: Flow, guidances=(1.0, 2.0, 3.0, 4.0), samplers=("sequential", "jacobi"), per_class=16, log=print
) -> dict:
    """Sampling defaults that score best on the checker (both colour and shape
    right), on noise separate from the reported evaluation; ties go to the
    lower guidance and then the sequential sampler."""
    best, best_acc = None, -1.0
    for sampler in samplers:
        for g in guidances:
            tic = time.perf_counter()
            r = checker_accuracy(model, per_class, seed=SELECT_SEED, guidance=g, sampler=sampler)
            if log:
                log(
                    f"guidance {g:g} {sampler:<10}  colour {r['colour_accuracy']:.1%}  "
                    f"shape {r['shape_accuracy']:.1%}  both {r['accuracy']:.1%}  "
                    f"({time.perf_counter() - tic:.1f} s)"
                )
            if r["accuracy"] > best_acc:
                best, best_acc = {"guidance": g, "sampler": sampler, "denoise": "score"}, r["accuracy"]
    return best


def grid_image(images: np.ndarray, rows: int, scale=4, gap=2, labels=None):
    """A PIL image of `images` (rows * cols) upscaled by `scale`, prompts on the left."""
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    cols = n // rows
    left = 110 if labels else gap
    tile_h, tile_w = h * scale, w * scale
    canvas = Image.new("RGB", (left + cols * (tile_w + gap), gap + rows * (tile_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y0 = gap + r * (tile_h + gap)
        if labels:
            draw.text((6, y0 + tile_h // 2 - 6), labels[r], fill=(0, 0, 0))
        for c in range(cols):
            tile = Image.fromarray(images[r * cols + c]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + c * (tile_w + gap), y0))
    return canvas


def sampling_defaults(model: Flow) -> dict:
    return model.config.sampling or {"guidance": 2.0, "sampler": "sequential", "denoise": "score"}


# -- command line ----------------------------------------------------------------


def _cmd_train(args):
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} already exists; pass --force to overwrite it")
    if args.init:  # continue training a saved model (fresh optimizer and schedule)
        init = load_flow(args.init)
        cfg = init.config
        cfg.sampling = None
    else:
        init = None
        cfg = demo_config(
            args.channels, args.head_dim, [int(v) for v in args.layers.split()], args.expansion, args.noise_std
        )
    model = init or Flow(cfg)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(
        f"demo model: {n_params / 1e6:.2f}M parameters, layers {cfg.layers_per_block}, "
        f"width {cfg.channels}, head_dim {cfg.head_dim}, noise_std {cfg.noise_std}"
    )
    tic = time.perf_counter()
    model, losses = train(
        cfg,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        label_drop=args.label_drop,
        seed=args.seed,
        init=init,
    )
    minutes = (time.perf_counter() - tic) / 60
    print(f"trained {args.steps} steps in {minutes:.1f} min")
    if args.dtype != "float32":
        model.update(tree_map(lambda p: p.astype(getattr(mx, args.dtype)), model.parameters()))
    print("choosing sampling defaults on the checker:")
    guidances = [float(g) for g in args.guidance.split()]
    cfg.sampling = select_sampling(model, guidances, per_class=args.select_per_class)
    print(f"sampling defaults: {cfg.sampling}")
    weights = dict(tree_flatten(model.parameters()))
    # Training settings go beside the config: FlowConfig accepts architecture keys only.
    stage = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "label_drop": args.label_drop,
        "seed": args.seed,
        "init": args.init,
        "minutes": round(minutes, 1),
        "final_loss_nats_per_dim": round(float(np.mean(losses[-100:])), 4),
    }
    # A continued run keeps the record of the runs it started from.
    previous = Path(args.init or "", "training.json")
    stages = json.loads(previous.read_text())["stages"] if args.init and previous.is_file() else []
    training = {"stages": stages + [stage]}
    save_model(out, cfg, weights, force=args.force, files={"training.json": json.dumps(training, indent=2) + "\n"})
    print(f"saved {out}")


def _load(path):
    return load_flow(Path(path) if path else DEMO_DIR)


def _cmd_evaluate(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = d["guidance"] if args.guidance is None else args.guidance
    sampler = args.sampler or d["sampler"]
    tic = time.perf_counter()
    r = checker_accuracy(model, args.n, seed=args.seed, guidance=g, sampler=sampler, denoise=d["denoise"])
    print(
        f"checker, {args.n} samples per class, guidance {g:g}, {sampler} sampler, "
        f"score denoising ({time.perf_counter() - tic:.1f} s):"
    )
    print(shapes.format_report(r))
    tic = time.perf_counter()
    bpd = held_out_bpd(model, args.held_out)
    print(
        f"held-out bits/dim ({args.held_out} fresh images, noise_std {model.config.noise_std}): "
        f"{bpd:.3f} ({time.perf_counter() - tic:.1f} s)"
    )
    if args.json:
        per = {
            k: {m: round(v, 4) if isinstance(v, float) else v for m, v in row.items()}
            for k, row in r["per_class"].items()
        }
        Path(args.json).write_text(
            json.dumps(
                {
                    "guidance": g,
                    "sampler": sampler,
                    "n_per_class": args.n,
                    "colour_accuracy": r["colour_accuracy"],
                    "shape_accuracy": r["shape_accuracy"],
                    "accuracy": r["accuracy"],
                    "per_class": per,
                    "held_out_bpd": bpd,
                },
                indent=2,
            )
            + "\n"
        )


def _cmd_grid(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = d["guidance"] if args.guidance is None else args.guidance
    n_cls = len(model.config.class_names)
    labels = np.repeat(np.arange(n_cls), args.cols)
    images = sample(model, labels, guidance=g, sampler=d["sampler"], denoise=d["denoise"], seed=args.seed)
    img = grid_image(images, n_cls, scale=args.scale, labels=list(model.config.class_names))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"saved {args.out} ({img.width}x{img.height}, guidance {g:g})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_starflow.demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the demo model from scratch")
    t.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    t.add_argument("--force", action="store_true", help="overwrite --out")
    t.add_argument("--steps", type=int, default=5200)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=7e-4, help="peak learning rate (linear warmup, then cosine decay)")
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--label-drop", type=float, default=0.1, help="share of labels replaced by the unconditional one")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", help="continue training this model folder instead of starting from scratch")
    t.add_argument("--channels", type=int, default=128)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--layers", default="1 1 1 4", help="layers per flow block, top (class-conditioned) block last")
    t.add_argument("--expansion", type=int, default=2, help="MLP width over model width")
    t.add_argument("--noise-std", type=float, default=0.1)
    t.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights"
    )
    t.add_argument("--guidance", default="1 2 3 4", help="guidance weights tried when choosing the defaults")
    t.add_argument("--select-per-class", type=int, default=8)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="checker accuracy per class and held-out bits/dim")
    e.add_argument("--model", help="model folder (default: the shipped demo)")
    e.add_argument("--n", type=int, default=32, help="samples per class")
    e.add_argument("--guidance", type=float, help="default: the model's recorded guidance")
    e.add_argument("--sampler", choices=["sequential", "jacobi"])
    e.add_argument("--held-out", type=int, default=1200, help="fresh images for bits/dim")
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--json", help="also write the numbers to this file")
    e.set_defaults(func=_cmd_evaluate)

    g = sub.add_parser("grid", help="a picture of samples for all twelve prompts")
    g.add_argument("--out", default="docs/demo_grid.png")
    g.add_argument("--model", help="model folder (default: the shipped demo)")
    g.add_argument("--cols", type=int, default=8)
    g.add_argument("--scale", type=int, default=4)
    g.add_argument("--guidance", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_grid)

    args = p.parse_args(argv)
    args.func(args)
