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

import json
import time
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..demo_common import training
from ..demo_common.classes import EVAL_SEED, HELD_OUT_SEED, SELECT_SEED, class_flow_config, sample_classes
from ..demo_common.classes import JACOBI as JACOBI
from ..demo_common.classes import LOG2_SCALE as LOG2_SCALE
from ..demo_common.classes import bpd_8bit as bpd_8bit
from ..demo_common.classes import class_text as class_text
from ..demo_common.classes import held_out_bpd as _held_out_bpd
from ..demo_common.drawing import labelled_rows
from ..loading.hub import DEMO_VIDEO as DEMO_VIDEO_DIR
from ..loading.video import FORMAT, load_video_flow
from ..models.config import FlowConfig
from ..models.video import VideoConfig, VideoFlow
from ..video_sample import sample_video
from . import checker, clips


def demo_config(channels=128, head_dim=64, layers=(1, 1, 4), expansion=2, noise_std=0.1):
    """(FlowConfig, VideoConfig) of the video demo: pixel-space STARFlow-V over
    FRAMES x SIZE x SIZE RGB clips, 4x4 patches, RoPE over (row, column, frame), SOS,
    softplus scales; shallow blocks frame-local, the class on the deep block only."""
    cfg = class_flow_config(clips.PROMPTS, clips.SIZE, channels, head_dim, layers, expansion, noise_std)
    video = VideoConfig(temporal_causal=1, shallow_block_local=True, frames=clips.FRAMES, fps=clips.FPS)
    return cfg, video


init_for_training = training.init_identity  # every block starts as the identity, small random SOS


def train(
    cfg: FlowConfig,
    video: VideoConfig,
    steps=3600,
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
        training.init_identity(model)
    else:
        model = init

    def next_batch():
        x, labels = clips.make_dataset(batch_size, int(rng.integers(2**31)), frames=video.frames)
        return mx.array(clips.to_model(x)), mx.array(labels.astype(np.int32))

    dims = cfg.in_channels * cfg.input_size**2 * video.frames
    line = partial(training.Progress.line, rate="{seen:.1f} clips/s")
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
        line=line,
    )
    return model, losses


# -- sampling and evaluation ---------------------------------------------------------------


def score_denoise(model: VideoFlow, x, y, noise_std=None):
    """The score step x + noise_std^2 * d/dx log p(x | y), y the conditional rows."""
    s = model.config.noise_std if noise_std is None else noise_std
    grad = mx.grad(lambda v: model.log_prob(v, y).sum())(x.astype(mx.float32))
    return x + (s * s) * grad


def _draw(model, noise, y, guidance, jacobi):
    return sample_video(model, noise, y, guidance, jacobi=jacobi)


def sample(
    model: VideoFlow, labels, guidance=1.0, sampler="sequential", denoise="score", seed=0, batch_size=48, frames=None
) -> np.ndarray:
    """uint8 clips (N, frames, H, W, 3) of the given class indices, in batches; clip i's
    noise depends on `seed` and N only, not on the batching."""
    cfg = model.config
    shape = (frames or model.video.frames, cfg.input_size, cfg.input_size, cfg.in_channels)
    return sample_classes(model, labels, shape, _draw, score_denoise, guidance, sampler, denoise, seed, batch_size)


def checker_accuracy(model: VideoFlow, per_class=4, seed=EVAL_SEED, **kwargs) -> dict:
    """Sample `per_class` clips of every prompt and judge them with the checker."""
    labels = np.repeat(np.arange(len(model.config.class_names)), per_class)
    x = sample(model, labels, seed=seed, **kwargs)
    result = checker.evaluate(x, [model.config.class_names[i] for i in labels])
    result["clips_uint8"] = x
    return result


def held_out_bpd(model: VideoFlow, n=480, seed=HELD_OUT_SEED, batch_size=48) -> float:
    """Bits/dim (8-bit units) of freshly drawn, noise-augmented clips of every class."""
    x, labels = clips.make_dataset(n, seed, frames=model.video.frames)
    return _held_out_bpd(model, x, labels, seed, batch_size)


def select_sampling(model: VideoFlow, guidances=(1.0, 2.0, 3.0), per_class=2, log=print) -> dict:
    """The guidance that scores best on the checker (colour and direction accuracy
    summed), on noise apart from the reported evaluation; ties go to the lower one."""

    def measure(g, sampler, denoise):
        r = checker_accuracy(model, per_class, seed=SELECT_SEED, guidance=g, sampler=sampler, denoise=denoise)
        what = (
            f"guidance {g:g}  colour {r['colour_accuracy']:.1%} of frames  "
            f"direction {r['direction_accuracy']:.1%} of clips"
        )
        return r["colour_accuracy"] + r["direction_accuracy"], what

    return training.select_sampling(measure, guidances, log=log)


def sampling_defaults(model: VideoFlow) -> dict:
    return model.config.sampling or {"guidance": 1.0, "sampler": "sequential", "denoise": "score"}


def strip_image(x: np.ndarray, labels, scale=4, gap=2):
    """A PIL image of clips (N, T, H, W, 3), one row of frames per clip, prompts on the left."""
    return labelled_rows(x, labels, left=190, scale=scale, gap=gap)


# -- command line -----------------------------------------------------------------------------


def _cmd_train(args):
    out = training.new_output(args)
    if args.init:  # continue training a saved model (fresh optimizer and schedule)
        init = load_video_flow(args.init)
        cfg, video = init.config, init.video
        cfg.sampling = None
    else:
        init = None
        layers = training.words(args.layers, int)
        cfg, video = demo_config(args.channels, args.head_dim, layers, args.expansion, args.noise_std)
    log = partial(print, flush=True)
    log(
        f"video demo model: {training.parameter_count(init or VideoFlow(cfg, video)) / 1e6:.2f}M parameters, "
        f"layers {cfg.layers_per_block}, width {cfg.channels}, "
        f"head_dim {cfg.head_dim}, clips {video.frames}x{cfg.input_size}x{cfg.input_size}"
    )
    model, stage = training.train_stage(
        args,
        partial(train, cfg, video, init=init, **training.stage_settings(args)),
        log,
    )
    log("choosing the guidance on the checker:")
    cfg.sampling = select_sampling(model, training.words(args.guidance), per_class=args.select_per_class)
    log(f"sampling defaults: {cfg.sampling}")
    training.save_stage(out, cfg, model, args, stage, extra={"format": FORMAT, "video": video.to_dict()}, log=log)


def _load(path):
    return load_video_flow(Path(path) if path else DEMO_VIDEO_DIR)


def _cmd_evaluate(args):
    model = _load(args.model)
    d = sampling_defaults(model)
    g = training.guidance_of(args, d)
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
    g = training.guidance_of(args, sampling_defaults(model))
    names = model.config.class_names
    prompts = args.prompt or [p for p in names if p.split()[1] == "circle"]
    labels = [clips.prompt_to_class(p) for p in prompts]
    x = sample(model, labels, guidance=g, seed=args.seed)
    img = strip_image(x, [names[i] for i in labels], scale=args.scale)
    training.save_picture(img, args.out, f" ({img.width}x{img.height}, guidance {g:g})")


def _commands(sub):
    t = sub.add_parser("train", help="train the video demo model from scratch (defaults: the shipped recipe)")
    training.add_flow_training_flags(
        t,
        steps=3600,
        lr=1e-3,
        warmup=100,
        layers="1 1 4",
        layers_help="layers per flow block, the deep (class-conditioned) block last",
        guidance="1 2 3",
        guidance_help="guidance weights tried when choosing the default",
        select_per_class=2,
        init_help="continue training this model folder (use another --seed: new clips)",
    )
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="colour per frame and direction per clip, by the checker")
    training.add_evaluate_flags(e, "video demo", 8, "clips per prompt", 480, "fresh clips for bits/dim")
    e.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("strip", help="a picture of sampled clips, one row of frames per prompt")
    s.add_argument("--out", default="docs/demo_video_strip.png")
    s.add_argument("--model", help="model folder (default: the shipped video demo)")
    s.add_argument("--prompt", nargs="*", help="default: every circle prompt")
    s.add_argument("--scale", type=training.count(1, 16), default=4)
    s.add_argument("--guidance", type=float)
    s.add_argument("--seed", type=training.SEED, default=0)
    s.set_defaults(func=_cmd_strip)


def main(argv=None):
    training.run_commands("python -m mlx_starflow.demo_video", __doc__.split("\n\n")[0], _commands, argv)
