"""The video demo model: a tiny class-conditional STARFlow-V trained on procedural clips.

A toy that ships inside the package (weights in model/) so that a clip can be made
offline in seconds and tests can judge motion from pixels; it is not Apple's 7B. The
prompt is one of the 48 classes of `clips.PROMPTS` ("red circle moving right", ...),
a one-hot text prefix of one token with an extra unconditional row for guidance (the
image demo's ClassEncoder). The model is `VideoFlow` as it is: 8 frames of 16x16 RGB
in pixels (no VAE), 4x4 patches (16 tokens a frame), frame-local shallow blocks and a
deep block causal over frames that sees the class. Training uses the flow's exact
log-likelihood as the loss; clips.py draws the data, checker.py (written apart from
it) judges samples.

Train with OpenBLAS preloaded (MLX's Linux wheel bundles the slow reference BLAS;
docs/demo.md). The shipped weights come from this one command:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 OPENBLAS_NUM_THREADS=1 \\
        python -m mlx_starflow.demo_video train --out /tmp/demo_video/run --force

    python -m mlx_starflow.demo_video evaluate      # colour per frame, direction per clip
    python -m mlx_starflow.demo_video strip --out docs/demo_video_strip.png
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
from mlx.utils import tree_flatten
from PIL import Image, ImageDraw

from ..loading.hub import DEMO_VIDEO as DEMO_VIDEO_DIR
from ..loading.video import FORMAT, load_video_flow
from ..loading.weights import save_model
from ..models.config import FlowConfig
from ..models.video import VideoConfig, VideoFlow
from ..pipeline import ClassEncoder
from ..sample import Jacobi
from ..video_sample import sample_video
from . import checker, clips

LOG2_SCALE = math.log2(127.5)  # [-1, 1] -> 8-bit levels, per dimension
SELECT_SEED = 2_000_003  # noise for choosing the sampling defaults
EVAL_SEED = 3_000_017  # noise for the reported accuracy
JACOBI = Jacobi(block_size=16, threshold=1e-3, max_iter=32)


def demo_config(channels=128, head_dim=64, layers=(1, 1, 4), expansion=2, noise_std=0.1):
    """(FlowConfig, VideoConfig) of the video demo: pixel-space STARFlow-V over
    FRAMES x SIZE x SIZE RGB clips, 4x4 patches, RoPE over (row, column, frame), SOS,
    softplus scales; shallow blocks frame-local, the class on the deep block only."""
    n = len(clips.PROMPTS)
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=3,
        input_size=clips.SIZE,
        patch_size=4,
        channels=channels,
        top_channels=channels,
        head_dim=head_dim,
        num_heads=channels // head_dim,
        num_kv_heads=channels // head_dim,
        top_num_heads=channels // head_dim,
        top_num_kv_heads=channels // head_dim,
        layers_per_block=list(layers),
        expansion=expansion,
        rope=True,
        pt_seq_len=clips.SIZE // 4,
        sos=True,
        seq_order="L2R",
        use_softplus=True,
        cond_top_only=True,
        txt_size=1,
        txt_dim=n + 1,
        noise_std=noise_std,
        class_names=list(clips.PROMPTS),
        image_size=clips.SIZE,
    )
    cfg.validate()
    video = VideoConfig(temporal_causal=1, shallow_block_local=True, frames=clips.FRAMES, fps=clips.FPS)
    return cfg, video


def class_text(labels, cfg: FlowConfig) -> mx.array:
    """One-hot text prefix (B, 1, classes + 1); label `len(class_names)` is unconditional."""
    return ClassEncoder.for_config(cfg).rows(labels)


def bpd_8bit(nats_per_dim):
    """Bits/dim of the noised 8-bit clip from nats/dim of the [-1, 1] density (as the image demo)."""
    return nats_per_dim / math.log(2) + LOG2_SCALE


def init_for_training(model: VideoFlow):
    """Every block starts as the identity (output projections at zero), small random SOS."""
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
    video: VideoConfig,
    steps=1300,
    batch_size=32,
    lr=1e-3,
    warmup=100,
    min_lr_ratio=0.02,
    weight_decay=1e-4,
    label_drop=0.1,
    grad_clip=1.0,
    seed=0,
    log_every=100,
    log=partial(print, flush=True),
    init: Optional[VideoFlow] = None,
):
    """Train a VideoFlow on freshly drawn clips, from scratch or continuing `init`;
    returns (model, losses in nats/dim). Every batch is new data, so the run is
    reproducible from `seed` (a continued run needs another seed, or it sees the same clips)."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    if init is None:
        model = VideoFlow(cfg, video)
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
    D = cfg.in_channels * cfg.input_size**2 * video.frames

    def loss_fn(x, y):
        return -model.log_prob(x, y).mean() / D

    # The random state goes in and out of the compiled step, so noise and label dropout
    # advance on every call instead of being baked in.
    @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
    def gradients(x, labels):
        x = x + cfg.noise_std * mx.random.normal(x.shape)
        drop = mx.random.uniform(shape=labels.shape) < label_drop
        y = class_text(mx.where(drop, n_cls, labels), cfg)
        loss, grads = nn.value_and_grad(model, loss_fn)(x, y)
        grads, norm = optim.clip_grad_norm(grads, grad_clip)
        return loss, grads, norm

    opt.init(model.trainable_parameters())
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        opt.update(model, grads)

    losses, skipped, tic, seen = [], 0, time.perf_counter(), 0
    for i in range(steps):
        x, labels = clips.make_dataset(batch_size, int(rng.integers(2**31)), frames=video.frames)
        loss, grads, norm = gradients(mx.array(clips.to_model(x)), mx.array(labels.astype(np.int32)))
        mx.eval(loss, grads, norm)
        loss = loss.item()
        # A rare batch can overflow: skip its update instead of poisoning Adam.
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
                f"{seen / dt:.1f} clips/s  {dt / 60:.1f} min"
            )
    return model, losses


# -- sampling and evaluation ---------------------------------------------------------------


def score_denoise(model: VideoFlow, x, y, noise_std=None):
    """The score step x + noise_std^2 * d/dx log p(x | y), y the conditional rows."""
    s = model.config.noise_std if noise_std is None else noise_std
    grad = mx.grad(lambda v: model.log_prob(v, y).sum())(x.astype(mx.float32))
    return x + (s * s) * grad


def sample(
    model: VideoFlow, labels, guidance=1.0, sampler="sequential", denoise="score", seed=0, batch_size=48, frames=None
) -> np.ndarray:
    """uint8 clips (N, frames, H, W, 3) of the given class indices, in batches; clip i's
    noise depends on `seed` and N only, not on the batching."""
    cfg = model.config
    if sampler not in ("sequential", "jacobi"):
        raise ValueError(f"sampler must be 'sequential' or 'jacobi', not {sampler!r}")
    if denoise not in ("score", "none"):
        raise ValueError(f"denoise must be 'score' or 'none', not {denoise!r}")
    labels = np.asarray(labels, dtype=np.int32)
    T = frames or model.video.frames
    s, c = cfg.input_size, cfg.in_channels
    noise = mx.random.normal((len(labels), T, s, s, c), key=mx.random.key(seed))
    uncond = len(cfg.class_names)
    out = []
    for i in range(0, len(labels), batch_size):
        lab = mx.array(labels[i : i + batch_size])
        y = class_text(lab, cfg)
        y_all = mx.concatenate([y, class_text(mx.full(lab.shape, uncond), cfg)]) if guidance > 0 else y
        x = sample_video(
            model, noise[i : i + batch_size], y_all, guidance, jacobi=JACOBI if sampler == "jacobi" else None
        )
        if denoise == "score":
            x = score_denoise(model, x, y)
        mx.eval(x)
        out.append(clips.from_model(x))
    return np.concatenate(out)


def checker_accuracy(model: VideoFlow, per_class=4, seed=EVAL_SEED, **kwargs) -> dict:
    """Sample `per_class` clips of every prompt and judge them with the checker."""
    labels = np.repeat(np.arange(len(model.config.class_names)), per_class)
    x = sample(model, labels, seed=seed, **kwargs)
    result = checker.evaluate(x, [model.config.class_names[i] for i in labels])
    result["clips_uint8"] = x
    return result


def held_out_bpd(model: VideoFlow, n=480, seed=1_000_003, batch_size=48) -> float:
    """Bits/dim (8-bit units) of freshly drawn, noise-augmented clips of every class."""
    cfg = model.config
    x_all, labels = clips.make_dataset(n, seed, frames=model.video.frames)
    keys = mx.random.split(mx.random.key(seed), -(-n // batch_size))
    D = cfg.in_channels * cfg.input_size**2 * model.video.frames
    total = 0.0
    for k, i in enumerate(range(0, n, batch_size)):
        x = mx.array(clips.to_model(x_all[i : i + batch_size]))
        x = x + cfg.noise_std * mx.random.normal(x.shape, key=keys[k])
        y = class_text(mx.array(labels[i : i + batch_size].astype(np.int32)), cfg)
        total += (-model.log_prob(x, y)).sum().item()
    return bpd_8bit(total / (n * D))


def select_sampling(model: VideoFlow, guidances=(1.0, 2.0, 3.0), per_class=2, log=print) -> dict:
    """The guidance that scores best on the checker (colour and direction accuracy
    summed), on noise apart from the reported evaluation; ties go to the lower one."""
    best, best_acc = None, -1.0
    for g in guidances:
        tic = time.perf_counter()
        r = checker_accuracy(model, per_class, seed=SELECT_SEED, guidance=g)
        acc = r["colour_accuracy"] + r["direction_accuracy"]
        if log:
            log(
                f"guidance {g:g}  colour {r['colour_accuracy']:.1%} of frames  "
                f"direction {r['direction_accuracy']:.1%} of clips  ({time.perf_counter() - tic:.1f} s)"
            )
        if acc > best_acc:
            best, best_acc = {"guidance": g, "sampler": "sequential", "denoise": "score"}, acc
    return best


def sampling_defaults(model: VideoFlow) -> dict:
    return model.config.sampling or {"guidance": 1.0, "sampler": "sequential", "denoise": "score"}


def strip_image(x: np.ndarray, labels, scale=4, gap=2):
    """A PIL image of clips (N, T, H, W, 3), one row of frames per clip, prompts on the left."""
    n, t, h, w, _ = x.shape
    left = 190
    th, tw = h * scale, w * scale
    canvas = Image.new("RGB", (left + t * (tw + gap), gap + n * (th + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(n):
        y0 = gap + r * (th + gap)
        draw.text((6, y0 + th // 2 - 6), labels[r], fill=(0, 0, 0))
        for c in range(t):
            tile = Image.fromarray(x[r, c]).resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + c * (tw + gap), y0))
    return canvas


# -- command line -----------------------------------------------------------------------------


def _cmd_train(args):
    out = Path(args.out)
    if out.exists() and not args.force:
        raise SystemExit(f"{out} already exists; pass --force to overwrite it")
    if args.init:  # continue training a saved model (fresh optimizer and schedule)
        init = load_video_flow(args.init)
        cfg, video = init.config, init.video
        cfg.sampling = None
    else:
        init = None
        cfg, video = demo_config(
            args.channels, args.head_dim, [int(v) for v in args.layers.split()], args.expansion, args.noise_std
        )
    n_params = sum(v.size for _, v in tree_flatten((init or VideoFlow(cfg, video)).parameters()))
    print(
        f"video demo model: {n_params / 1e6:.2f}M parameters, layers {cfg.layers_per_block}, width {cfg.channels}, "
        f"head_dim {cfg.head_dim}, clips {video.frames}x{cfg.input_size}x{cfg.input_size}",
        flush=True,
    )
    tic = time.perf_counter()
    model, losses = train(
        cfg,
        video,
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
    print(f"trained {args.steps} steps in {minutes:.1f} min", flush=True)
    print("choosing the guidance on the checker:", flush=True)
    cfg.sampling = select_sampling(model, [float(g) for g in args.guidance.split()], per_class=args.select_per_class)
    print(f"sampling defaults: {cfg.sampling}", flush=True)
    stage = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "label_drop": args.label_drop,
        "seed": args.seed,
        "minutes": round(minutes, 1),
        "init": args.init,
        "final_loss_nats_per_dim": round(float(np.mean(losses[-100:])), 4),
    }
    # A continued run keeps the record of the runs it started from.
    previous = Path(args.init or "", "training.json")
    stages = json.loads(previous.read_text()).get("stages", []) if args.init and previous.is_file() else []
    training = {"stages": stages + [stage]}
    save_model(
        out,
        cfg,
        dict(tree_flatten(model.parameters())),
        force=args.force,
        extra={"format": FORMAT, "video": video.to_dict()},
        files={"training.json": json.dumps(training, indent=2) + "\n"},
    )
    print(f"saved {out}")


def _load(path):
    return load_video_flow(Path(path) if path else DEMO_VIDEO_DIR)


def _cmd_evaluate(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = d["guidance"] if args.guidance is None else args.guidance
    tic = time.perf_counter()
    r = checker_accuracy(model, args.n, seed=args.seed, guidance=g, sampler=args.sampler or d["sampler"])
    dt = time.perf_counter() - tic
    print(f"checker, {args.n} clips per prompt, guidance {g:g}, score denoising ({dt:.1f} s):")
    print(checker.format_report(r))
    tic = time.perf_counter()
    bpd = held_out_bpd(model, args.held_out)
    print(f"held-out bits/dim ({args.held_out} fresh clips): {bpd:.3f} ({time.perf_counter() - tic:.1f} s)")
    if args.json:
        keep = ("clips", "frames", "colour_accuracy", "direction_accuracy", "per_prompt")
        Path(args.json).write_text(
            json.dumps({"guidance": g, **{k: r[k] for k in keep}, "held_out_bpd": bpd}, indent=2) + "\n"
        )


def _cmd_strip(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = d["guidance"] if args.guidance is None else args.guidance
    names = model.config.class_names
    prompts = args.prompt or [p for p in names if p.split()[1] == "circle"]
    labels = [clips.prompt_to_class(p) for p in prompts]
    x = sample(model, labels, guidance=g, seed=args.seed)
    img = strip_image(x, [names[i] for i in labels], scale=args.scale)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"saved {args.out} ({img.width}x{img.height}, guidance {g:g})")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_starflow.demo_video", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the video demo model from scratch (defaults: the shipped recipe)")
    t.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    t.add_argument("--force", action="store_true", help="overwrite --out")
    t.add_argument("--steps", type=int, default=1300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warmup, then cosine decay)")
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--label-drop", type=float, default=0.1, help="share of labels replaced by the unconditional one")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", help="continue training this model folder (use another --seed: new clips)")
    t.add_argument("--channels", type=int, default=128)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--layers", default="1 1 4", help="layers per flow block, the deep (class-conditioned) block last")
    t.add_argument("--expansion", type=int, default=2, help="MLP width over model width")
    t.add_argument("--noise-std", type=float, default=0.1)
    t.add_argument("--guidance", default="1 2 3", help="guidance weights tried when choosing the default")
    t.add_argument("--select-per-class", type=int, default=2)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="colour per frame and direction per clip, by the checker")
    e.add_argument("--model", help="model folder (default: the shipped video demo)")
    e.add_argument("--n", type=int, default=8, help="clips per prompt")
    e.add_argument("--guidance", type=float, help="default: the model's recorded guidance")
    e.add_argument("--sampler", choices=["sequential", "jacobi"])
    e.add_argument("--held-out", type=int, default=480, help="fresh clips for bits/dim")
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--json", help="also write the numbers to this file")
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("strip", help="a picture of sampled clips, one row of frames per prompt")
    s.add_argument("--out", default="docs/demo_video_strip.png")
    s.add_argument("--model", help="model folder (default: the shipped video demo)")
    s.add_argument("--prompt", nargs="*", help="default: every circle prompt")
    s.add_argument("--scale", type=int, default=4)
    s.add_argument("--guidance", type=float)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_strip)

    args = p.parse_args(argv)
    args.func(args)
