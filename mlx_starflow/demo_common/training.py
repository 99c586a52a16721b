"""The demos' training machinery: optimizer and schedule, the identity start, the step
loop, the training flags, the saved model folder with its training.json, the choice of
sampling defaults on a checker, and the command-line scaffolding.

Each demo supplies what is its own (data, loss, configuration, checker); what is here
is what the three recipes did alike, so a run with the same flags and seed gives the
same weights as before it moved here.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..cli.common import prefer_openblas
from ..loading.weights import save_model
from ..models.config import FlowConfig
from .classes import EVAL_SEED, bpd_8bit, class_text


def adamw(lr, steps, warmup, min_lr_ratio=0.02, weight_decay=1e-4) -> optim.AdamW:
    """AdamW (betas 0.9, 0.95) whose rate rises linearly to `lr` over `warmup` steps (at
    most steps - 1), then falls along a cosine to lr * min_lr_ratio at `steps`."""
    warm = min(warmup, max(steps - 1, 1))
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / warm, lr, warm), optim.cosine_decay(lr, max(steps - warm, 1), lr * min_lr_ratio)],
        [warm],
    )
    return optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=weight_decay)


def init_identity(model):
    """The reference's initial state: output projections at zero (each block starts as
    the identity) and small random SOS embeddings."""
    for block in model.blocks:
        if "proj_out" not in block:
            continue
        block.proj_out.weight = mx.zeros_like(block.proj_out.weight)
        block.proj_out.bias = mx.zeros_like(block.proj_out.bias)
        if "sos_embed" in block:
            block.sos_embed = 0.02 * mx.random.normal(block.sos_embed.shape)
    mx.eval(model.parameters())


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def noisy_gradients(model, loss_fn, noise_std, grad_clip=1.0, condition=None):
    """A compiled step (data, c) -> (loss, clipped gradients, their norm): the data plus
    Gaussian noise of `noise_std`, loss_fn(x, condition(c)) differentiated over the model.

    The random state is an input and output of the compiled function, so the noise (and
    any randomness of `condition`, e.g. label dropout) advance on every call instead of
    being baked in; the model is an output too, as value_and_grad writes its parameters.
    loss_fn may return (differentiated, logged): the loss reported is then the second."""

    @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
    def gradients(data, c):
        x = data + noise_std * mx.random.normal(data.shape)
        y = c if condition is None else condition(c)
        loss, grads = nn.value_and_grad(model, loss_fn)(x, y)
        if isinstance(loss, (tuple, list)):
            loss = loss[1]
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
        return loss, grads, norm

    return gradients


@dataclass
class Progress:
    """Where a run stands, for its log line: `loss` is the mean of the last log_every
    losses (nats/dim); `seen` counts the examples of the applied steps, `drawn` all."""

    step: int
    steps: int
    loss: float
    grad_norm: float
    lr: float
    skipped: int
    seen: int
    drawn: int
    seconds: float

    def line(self, prefix="", bits=True, rate="{seen:.0f} img/s") -> str:
        """The log line; bits: also bits/dim of 8-bit data; rate: a format of the
        throughput, {seen} or {drawn} per second."""
        head = f"{prefix}step {self.step}/{self.steps}  loss {self.loss:.4f} nats/dim  "
        if bits:
            head += f"{bpd_8bit(self.loss):.3f} bits/dim  "
        speed = rate.format(seen=self.seen / self.seconds, drawn=self.drawn / self.seconds)
        return (
            head + f"grad norm {self.grad_norm:.2f}  lr {self.lr:.2e}  skipped {self.skipped}  "
            f"{speed}  {self.seconds / 60:.1f} min"
        )


def fit(model, opt, gradients, next_batch, steps, log=print, log_every=100, line=Progress.line, stop_after=None):
    """The step loop; returns the losses (nats/dim) of the applied steps.

    next_batch() gives the next (data, condition) as mx arrays for `gradients` (from
    noisy_gradients); line(Progress) the log line, every log_every steps and at the last.
    stop_after: end after this many steps of the schedule for `steps`. A rare batch can
    overflow (a tiny predicted scale meets an outlier): its update is skipped, as the
    reference's grad_skip does, instead of poisoning Adam."""
    opt.init(model.trainable_parameters())  # the state must exist before compile captures it
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        opt.update(model, grads)

    losses, skipped, tic, seen, drawn = [], 0, time.perf_counter(), 0, 0
    for i in range(steps if stop_after is None else min(stop_after, steps)):
        data, c = next_batch()
        loss, grads, norm = gradients(data, c)
        mx.eval(loss, grads, norm)
        loss = loss.item()
        drawn += len(data)
        if not (math.isfinite(loss) and math.isfinite(norm.item())):
            skipped += 1
            if skipped > max(10, steps // 50):
                raise FloatingPointError(f"{skipped} non-finite steps by step {i + 1}; lower the learning rate")
            continue
        update(grads)
        mx.eval(state)
        losses.append(loss)
        seen += len(data)
        if log and ((i + 1) % log_every == 0 or i == steps - 1):
            p = Progress(
                step=i + 1,
                steps=steps,
                loss=float(np.mean(losses[-log_every:])),
                grad_norm=norm.item(),
                lr=opt.learning_rate.item(),
                skipped=skipped,
                seen=seen,
                drawn=drawn,
                seconds=time.perf_counter() - tic,
            )
            log(line(p))
    return losses


def train_classes(
    model,
    cfg: FlowConfig,
    next_batch,
    dims,
    *,
    steps,
    lr,
    warmup,
    min_lr_ratio,
    weight_decay,
    label_drop,
    grad_clip,
    log=print,
    log_every=100,
    line=Progress.line,
):
    """The class-conditional demos' recipe (image and video): AdamW with warmup and cosine
    decay, the loss -log p(x~ | class) / dims of noise-augmented data, a share label_drop
    of the labels replaced by the unconditional one (drawn inside the compiled step).
    cfg: the model's configuration (noise, classes); next_batch() gives (data in [-1, 1],
    int32 labels); returns the losses."""
    opt = adamw(lr, steps, warmup, min_lr_ratio, weight_decay)
    n_cls = len(cfg.class_names)

    def loss_fn(x, y):
        return -model.log_prob(x, y).mean() / dims

    def condition(labels):
        drop = mx.random.uniform(shape=labels.shape) < label_drop
        return class_text(mx.where(drop, n_cls, labels), cfg)

    gradients = noisy_gradients(model, loss_fn, cfg.noise_std, grad_clip, condition)
    return fit(model, opt, gradients, next_batch, steps, log, log_every, line)


# -- the model folder ------------------------------------------------------------------------


def final_loss(losses) -> float:
    """The mean of the last 100 losses, as the training records keep it."""
    return round(float(np.mean(losses[-100:])), 4)


def stage_settings(args) -> dict:
    """The training settings of `add_flow_training_flags`' flags, as keywords of a demo's train()."""
    keys = ("steps", "batch_size", "lr", "warmup", "weight_decay", "label_drop", "seed")
    return {k: getattr(args, k) for k in keys}


def stage_record(args, minutes, losses) -> dict:
    """One training stage of `add_flow_training_flags`' flags, for training.json."""
    return {
        **stage_settings(args),
        "init": args.init,
        "minutes": round(minutes, 1),
        "final_loss_nats_per_dim": final_loss(losses),
    }


def earlier_stages(init) -> list:
    """The stages of the model folder a continued run starts from (none for a fresh run)."""
    previous = Path(init or "", "training.json")
    return json.loads(previous.read_text()).get("stages", []) if init and previous.is_file() else []


def save_folder(out, cfg: FlowConfig, model, training: dict, force=False, extra=None):
    """The model folder: config.json, model.safetensors and training.json (the training
    settings go beside the config: FlowConfig accepts architecture keys only)."""
    weights = dict(tree_flatten(model.parameters()))
    files = {"training.json": json.dumps(training, indent=2) + "\n"}
    return save_model(out, cfg, weights, force=force, extra=extra, files=files)


def train_stage(args, train, log=print):
    """Run train() -> (model, losses), timed; returns (model, its stage_record)."""
    tic = time.perf_counter()
    model, losses = train()
    minutes = (time.perf_counter() - tic) / 60
    log(f"trained {args.steps} steps in {minutes:.1f} min")
    return model, stage_record(args, minutes, losses)


def save_stage(out, cfg: FlowConfig, model, args, stage, extra=None, log=print):
    """Save the model with training.json: the --init folder's stages, then this one."""
    save_folder(out, cfg, model, {"stages": earlier_stages(args.init) + [stage]}, force=args.force, extra=extra)
    log(f"saved {out}")


# -- sampling defaults -------------------------------------------------------------------------


def select_sampling(measure, guidances, samplers=("sequential",), *, denoisers=("score",), log=print) -> dict:
    """The sampling defaults that score best on a checker. measure(guidance, sampler,
    denoise) gives (score, a line to log); ties go to the first tried: the earlier
    denoiser, then sampler, then the lower guidance."""
    best, best_score = None, -1.0
    for denoise in denoisers:
        for sampler in samplers:
            for g in guidances:
                tic = time.perf_counter()
                score, what = measure(g, sampler, denoise)
                if log:
                    log(f"{what}  ({time.perf_counter() - tic:.1f} s)")
                if score > best_score:
                    best, best_score = {"guidance": g, "sampler": sampler, "denoise": denoise}, score
    return best


# -- command line ------------------------------------------------------------------------------


def count(lo: int, hi: int):
    """An argparse type: a whole number from lo to hi. Every flag that sets an amount of
    work takes one, so a typo cannot start a run of a million years."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {lo} to {hi}")
        return value

    parse.__name__ = "count"
    return parse


def real(lo: float, hi: float):
    """An argparse type: a finite number from lo to hi."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= value <= hi:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value} is out of range: {lo} to {hi}")
        return value

    parse.__name__ = "number"
    return parse


STEPS = count(1, 1_000_000)
IMAGES = count(1, 100_000)  # images, prompts or clips an evaluation makes
SEED = count(0, 2**31 - 1)


def add_run_flags(t: argparse.ArgumentParser, out_help, steps, lr, batch_size=32):
    """--out, --steps, --batch-size, --lr, --seed: the flags every demo's train command has."""
    t.add_argument("--out", required=True, help=out_help)
    t.add_argument("--steps", type=STEPS, default=steps)
    t.add_argument("--batch-size", type=count(1, 4096), default=batch_size)
    t.add_argument("--lr", type=float, default=lr, help="peak learning rate (linear warmup, then cosine decay)")
    t.add_argument("--seed", type=SEED, default=0)


def add_flow_training_flags(
    t: argparse.ArgumentParser,
    *,
    steps,
    lr,
    warmup,
    layers,
    layers_help,
    guidance,
    guidance_help,
    select_per_class,
    init_help,
):
    """The train flags of the class-conditional demos (image and video), with their defaults."""
    add_run_flags(t, "model folder to write (config.json + model.safetensors)", steps, lr)
    t.add_argument("--force", action="store_true", help="overwrite --out")
    t.add_argument("--warmup", type=count(0, 1_000_000), default=warmup)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--label-drop", type=float, default=0.1, help="share of labels replaced by the unconditional one")
    t.add_argument("--init", help=init_help)
    t.add_argument("--channels", type=count(8, 4096), default=128)
    t.add_argument("--head-dim", type=count(8, 512), default=64)
    t.add_argument("--layers", default=layers, help=layers_help)
    t.add_argument("--expansion", type=count(1, 16), default=2, help="MLP width over model width")
    t.add_argument("--noise-std", type=float, default=0.1)
    t.add_argument("--guidance", default=guidance, help=guidance_help)
    t.add_argument("--select-per-class", type=count(1, 10_000), default=select_per_class)


def add_evaluate_flags(e: argparse.ArgumentParser, what, n, n_help, held_out, held_out_help):
    """The evaluate flags of the class-conditional demos: the model (default: the shipped
    `what`), samples per class, guidance and sampler, held-out data for bits/dim."""
    e.add_argument("--model", help=f"model folder (default: the shipped {what})")
    e.add_argument("--n", type=IMAGES, default=n, help=n_help)
    e.add_argument("--guidance", type=float, help="default: the model's recorded guidance")
    e.add_argument("--sampler", choices=["sequential", "jacobi"])
    e.add_argument("--held-out", type=IMAGES, default=held_out, help=held_out_help)
    e.add_argument("--seed", type=SEED, default=EVAL_SEED)
    e.add_argument("--json", help="also write the numbers to this file")


def save_picture(img, out, note=""):
    """Save a PIL picture to `out` (its folder made) and say so."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    print(f"saved {out}{note}")


def new_output(args) -> Path:
    """--out, refused when it exists and --force is not given."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} already exists; pass --force to overwrite it")
    return out


def words(text, kind=float) -> list:
    """A flag of numbers apart by spaces ("1 2 3") as a list."""
    return [kind(v) for v in text.split()]


def guidance_of(args, defaults: dict):
    """--guidance, or the model's recorded default when it is not given."""
    return defaults["guidance"] if args.guidance is None else args.guidance


def run_commands(prog, description, add_commands, argv=None):
    """Parse argv for a demo's subcommands (add_commands(subparsers) sets each one's
    func) and run the chosen one. From the command line (argv None), first as the
    package's commands do: again with the system's OpenBLAS preloaded when MLX would use
    its reference BLAS (training is float32 matmuls; --no-openblas keeps the bundled one)."""
    if argv is None:
        argv = prefer_openblas(sys.argv[1:])
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    args.func(args)
