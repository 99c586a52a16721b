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

import json
import time
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..demo_common import training
from ..demo_common.classes import (
    EVAL_SEED,
    HELD_OUT_SEED,
    SELECT_SEED,
    class_flow_config,
    sample_classes,
)
from ..demo_common.classes import JACOBI as JACOBI
from ..demo_common.classes import LOG2_SCALE as LOG2_SCALE
from ..demo_common.classes import bpd_8bit as bpd_8bit
from ..demo_common.classes import class_text as class_text
from ..demo_common.classes import held_out_bpd as _held_out_bpd
from ..demo_common.drawing import labelled_rows
from ..loading.hub import DEMO as DEMO_DIR
from ..loading.weights import load_flow
from ..models.config import FlowConfig
from ..models.flow import Flow
from ..sample import sample as flow_sample
from . import shapes


def demo_config(
    channels=128, head_dim=64, layers=(1, 1, 1, 4), expansion=2, noise_std=0.1, top_channels=None
) -> FlowConfig:
    """Pixel-space STARFlow for 32x32 RGB: 4x4 patches (64 tokens of 48), RoPE,
    SOS, softplus scales, deep-shallow blocks with the class on the top block."""
    return class_flow_config(shapes.PROMPTS, 32, channels, head_dim, layers, expansion, noise_std, top_channels)


init_for_training = training.init_identity  # the reference's initial state: each block the identity


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
        training.init_identity(model)
    else:
        model = init

    def next_batch():
        images, labels = shapes.make_dataset(batch_size, int(rng.integers(2**31)))
        return mx.array(shapes.to_model(images)), mx.array(labels.astype(np.int32))

    dims = cfg.in_channels * cfg.input_size**2
    losses = training.train_classes(
        model,
        cfg,
        next_batch,
        dims,
        steps=steps,
        lr=lr,
        warmup=warmup,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        label_drop=label_drop,
        grad_clip=grad_clip,
        log=log,
        log_every=log_every,
    )
    return model, losses


# -- sampling and evaluation ---------------------------------------------------


def _draw(model, noise, y, guidance, jacobi):
    return flow_sample(model, noise, y, guidance=guidance, jacobi=jacobi)


def _score_step(model, x, y):
    return model.denoise(x, y)


def sample(
    model: Flow, labels, guidance=2.0, sampler="sequential", denoise="score", seed=0, batch_size=96
) -> np.ndarray:
    """uint8 images (N, 32, 32, 3) of the given class indices, in batches."""
    cfg = model.config
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    return sample_classes(model, labels, shape, _draw, _score_step, guidance, sampler, denoise, seed, batch_size)


def checker_accuracy(model: Flow, per_class=16, seed=EVAL_SEED, **kwargs) -> dict:
    """Sample `per_class` images of every class and run the shape checker."""
    labels = np.repeat(np.arange(len(model.config.class_names)), per_class)
    images = sample(model, labels, seed=seed, **kwargs)
    result = shapes.evaluate(images, labels)
    result["images"] = images
    return result


def held_out_bpd(model: Flow, n=1200, seed=HELD_OUT_SEED, batch_size=100) -> float:
    """Bits/dim (8-bit units) of freshly drawn, noise-augmented images of every class."""
    images, labels = shapes.make_dataset(n, seed)
    return _held_out_bpd(model, images, labels, seed, batch_size)


def select_sampling(
    model: Flow, guidances=(1.0, 2.0, 3.0, 4.0), samplers=("sequential", "jacobi"), per_class=16, log=print
) -> dict:
    """Sampling defaults that score best on the checker (both colour and shape
    right), on noise separate from the reported evaluation; ties go to the
    sequential sampler and then the lower guidance."""

    def measure(g, sampler, denoise):
        r = checker_accuracy(model, per_class, seed=SELECT_SEED, guidance=g, sampler=sampler, denoise=denoise)
        what = (
            f"guidance {g:g} {sampler:<10}  colour {r['colour_accuracy']:.1%}  "
            f"shape {r['shape_accuracy']:.1%}  both {r['accuracy']:.1%}"
        )
        return r["accuracy"], what

    return training.select_sampling(measure, guidances, samplers, log=log)


def grid_image(images: np.ndarray, rows: int, scale=4, gap=2, labels=None):
    """A PIL image of `images` (rows * cols) upscaled by `scale`, prompts on the left."""
    n, h, w, _ = images.shape
    cols = n // rows
    tiles = images[: rows * cols].reshape(rows, cols, h, w, 3)
    return labelled_rows(tiles, labels, left=110 if labels else gap, scale=scale, gap=gap)


def sampling_defaults(model: Flow) -> dict:
    return model.config.sampling or {"guidance": 2.0, "sampler": "sequential", "denoise": "score"}


# -- command line ----------------------------------------------------------------


def _cmd_train(args):
    out = training.new_output(args)
    if args.init:  # continue training a saved model (fresh optimizer and schedule)
        init = load_flow(args.init)
        cfg = init.config
        cfg.sampling = None
    else:
        init = None
        cfg = demo_config(
            args.channels, args.head_dim, training.words(args.layers, int), args.expansion, args.noise_std
        )
    model = init or Flow(cfg)
    print(
        f"demo model: {training.parameter_count(model) / 1e6:.2f}M parameters, layers {cfg.layers_per_block}, "
        f"width {cfg.channels}, head_dim {cfg.head_dim}, noise_std {cfg.noise_std}"
    )
    model, stage = training.train_stage(
        args,
        partial(train, cfg, init=init, **training.stage_settings(args)),
    )
    if args.dtype != "float32":
        model.update(tree_map(lambda p: p.astype(getattr(mx, args.dtype)), model.parameters()))
    print("choosing sampling defaults on the checker:")
    cfg.sampling = select_sampling(model, training.words(args.guidance), per_class=args.select_per_class)
    print(f"sampling defaults: {cfg.sampling}")
    training.save_stage(out, cfg, model, args, stage)


def _load(path):
    return load_flow(Path(path) if path else DEMO_DIR)


def _cmd_evaluate(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = training.guidance_of(args, d)
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
    g = training.guidance_of(args, d)
    n_cls = len(model.config.class_names)
    labels = np.repeat(np.arange(n_cls), args.cols)
    images = sample(model, labels, guidance=g, sampler=d["sampler"], denoise=d["denoise"], seed=args.seed)
    img = grid_image(images, n_cls, scale=args.scale, labels=list(model.config.class_names))
    training.save_picture(img, args.out, f" ({img.width}x{img.height}, guidance {g:g})")


def _commands(sub):
    t = sub.add_parser("train", help="train the demo model from scratch")
    training.add_flow_training_flags(
        t,
        steps=5200,
        lr=7e-4,
        warmup=300,
        layers="1 1 1 4",
        layers_help="layers per flow block, top (class-conditioned) block last",
        guidance="1 2 3 4",
        guidance_help="guidance weights tried when choosing the defaults",
        select_per_class=8,
        init_help="continue training this model folder instead of starting from scratch",
    )
    t.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights"
    )
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="checker accuracy per class and held-out bits/dim")
    training.add_evaluate_flags(e, "demo", 32, "samples per class", 1200, "fresh images for bits/dim")
    e.set_defaults(func=_cmd_evaluate)

    g = sub.add_parser("grid", help="a picture of samples for all twelve prompts")
    g.add_argument("--out", default="docs/demo_grid.png")
    g.add_argument("--model", help="model folder (default: the shipped demo)")
    g.add_argument("--cols", type=training.count(1, 64), default=8)
    g.add_argument("--scale", type=training.count(1, 16), default=4)
    g.add_argument("--guidance", type=float)
    g.add_argument("--seed", type=training.SEED, default=0)
    g.set_defaults(func=_cmd_grid)


def main(argv=None):
    training.run_commands("python -m mlx_starflow.demo", __doc__.split("\n\n")[0], _commands, argv)
