"""python -m mlx_starflow.demo_text: train, select, evaluate, grid."""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..demo_common import training
from ..demo_common.drawing import labelled_rows
from ..loading.weights import read_config
from ..pipeline import Pipeline
from . import evaluate, train

EXAMPLES = (
    "a small red circle in the top left corner",
    "top-left: a little yellow disc",
    "a big blue square in the center on a white background",
    "there is a large green triangle at the bottom right",
    "a tiny purple box on the left side, gray background",
    "a cyan triangle at the top and a big red square at the bottom left",
)


def _pipe(model):
    return Pipeline.from_pretrained(model or "demo-text", dtype="float32")


def _cmd_train(args):
    folder = train.run(
        args.out,
        deep_init=args.deep_init,
        seed=args.seed,
        lm_steps=args.lm_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        channels=args.channels,
        lm_folder=args.lm,
        stop_after=args.stop_after,
        patch_size=args.patch_size,
        shallow=args.shallow,
        beta=args.beta,
        train_table=not args.frozen_embeddings,
    )
    write_examples(folder)
    if not args.no_select:
        _select(folder)


def write_examples(folder):
    """The example prompts the web page offers, beside the model (examples.txt)."""
    (Path(folder) / "examples.txt").write_text("\n".join(EXAMPLES) + "\n")


def _select(folder, guidances=(0.5, 1.0, 2.0, 3.0), n=48):
    """Choose the sampling defaults on the checker and write them into config.json."""
    print("choosing sampling defaults on the checker (held-out single objects, sequential, score step):")
    best = evaluate.select_sampling(_pipe(str(folder)), guidances, n)
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg["sampling"] = best
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"sampling defaults: {best}")


def _cmd_select(args):
    _select(args.model, training.words(args.guidance), args.n)


def _fmt(r):
    keys = [k for k in ("colour", "shape", "size", "cell", "present", "both_present") if k in r]
    return "  ".join(f"{k} {r[k]:.1%}" for k in keys) + f"  (n={r['n']})"


def _cmd_evaluate(args):
    pipe = _pipe(args.model)
    opts = {} if args.guidance is None else {"guidance": args.guidance}
    report = {"model": args.model or "demo-text", "sampling": read_config(pipe.info["flow"]).sampling}
    report["zero-shot noise_samples"] = args.noise_samples
    for name, objects, phrasing in (
        ("one object, training phrasings", 1, False),
        ("one object, held-out phrasings", 1, True),
        ("two objects, training phrasings", 2, False),
        ("two objects, held-out phrasings", 2, True),
    ):
        tic = time.perf_counter()
        r = evaluate.checker_accuracy(pipe, args.n, objects=objects, held_phrasing=phrasing, **opts)
        print(f"{name}: {_fmt(r)}  ({time.perf_counter() - tic:.0f} s)", flush=True)
        report[name] = {k: v for k, v in r.items() if k not in ("images", "prompts")}
    for source, held in (("drawn", True), ("generated", True), ("drawn", False)):
        tic = time.perf_counter()
        r = evaluate.rank_captions(
            pipe, args.rank_n, source=source, held=held, noise_samples=args.noise_samples, **opts
        )
        what = f"{source} images, {'held-out' if held else 'training'} combinations"
        print(
            f"zero-shot, own caption first among ten ({what}): {r['first']:.1%}  "
            f"mean rank {r['mean_rank']:.2f}  (n={r['n']}, {time.perf_counter() - tic:.0f} s)",
            flush=True,
        )
        report[f"zero-shot {what}"] = r
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _cmd_grid(args):
    pipe = _pipe(args.model)
    prompts = args.prompt or list(EXAMPLES)
    images = []
    for p in prompts:
        images += [np.asarray(im) for im in pipe.generate([p], num_images=args.cols, seed=args.seed).images]
    grid = grid_image(np.stack(images), len(prompts), args.scale, prompts)
    training.save_picture(grid, args.out)


def grid_image(images, rows, scale, labels):
    """A PIL image of `images` (rows * cols) upscaled by `scale`, prompts on the left."""
    n, h, w, _ = images.shape
    cols = n // rows
    return labelled_rows(images[: rows * cols].reshape(rows, cols, h, w, 3), labels, left=330, scale=scale, gap=2)


MAX_SHALLOW, MAX_LAYERS = 4, 8


def _shallow(text):
    """--shallow: layers of each shallow block, apart by spaces."""
    try:
        layers = tuple(training.words(text, int))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: whole numbers apart by spaces, e.g. "1 1"') from None
    if len(layers) > MAX_SHALLOW or any(not 1 <= n <= MAX_LAYERS for n in layers):
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SHALLOW} blocks of 1 to {MAX_LAYERS} layers")
    return layers


def _commands(sub):
    t = sub.add_parser("train", help="pretrain the LM on captions, then train the flow (reproducible from --seed)")
    training.add_run_flags(t, "folder to write: lm/ (mlx-lm) and model/ (the flow)", steps=12000, lr=1e-3)
    t.add_argument("--deep-init", choices=["lm", "scratch"], default="lm", help="the deep block's initial layers")
    t.add_argument("--lm-steps", type=training.STEPS, default=300)
    t.add_argument("--channels", type=training.count(8, 4096), default=64, help="width of the shallow blocks")
    t.add_argument(
        "--patch-size",
        type=int,
        choices=train.PATCH_SIZES,
        default=train.PATCH_SIZE,
        help="pixels per patch side (12: a token per cell)",
    )
    t.add_argument(
        "--shallow",
        type=_shallow,
        default=train.SHALLOW,
        help=f'layers of each shallow block, e.g. "1 1" (1-{MAX_LAYERS} each, at most {MAX_SHALLOW} blocks; '
        '"": the deep block alone)',
    )
    t.add_argument(
        "--beta",
        type=training.real(0.0, 2.0),
        default=train.BETA,
        help="weight each dimension's likelihood term by its predicted scale^(2 beta) (0: plain likelihood)",
    )
    t.add_argument(
        "--frozen-embeddings",
        action="store_true",
        help="keep the LM's token embedding table (the text encoder) as the LM left it (the recipe trains it)",
    )
    t.add_argument("--lm", help="an LM folder a run of this command pretrained (skips the LM's pretraining)")
    t.add_argument("--stop-after", type=training.STEPS, help="stop the flow's training after this many steps")
    t.add_argument("--no-select", action="store_true", help="do not choose the sampling defaults afterwards")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("select", help="choose the sampling defaults on the checker, into the model's config.json")
    s.add_argument("--model", required=True, help="model folder")
    s.add_argument("--guidance", default="0.5 1 2 3")
    s.add_argument("--n", type=training.IMAGES, default=48)
    s.set_defaults(func=_cmd_select)

    e = sub.add_parser("evaluate", help="checker accuracies on held-out combinations; zero-shot caption ranking")
    e.add_argument("--model", help="model folder (default: the shipped demo-text)")
    e.add_argument("--n", type=training.IMAGES, default=96, help="prompts per group")
    e.add_argument("--rank-n", type=training.IMAGES, default=50, help="images per zero-shot group")
    e.add_argument(
        "--noise-samples",
        type=training.count(0, 64),
        default=evaluate.RANK_NOISE,
        help="rank by the likelihood of the image noised as in training, over this many draws (0: dequantized)",
    )
    e.add_argument("--guidance", type=float, help="default: the model's own")
    e.add_argument("--json", help="also write the numbers here")
    e.set_defaults(func=_cmd_evaluate)

    g = sub.add_parser("grid", help="a picture of samples, one row per prompt")
    g.add_argument("--out", default="docs/demo_text_grid.png")
    g.add_argument("--model")
    g.add_argument("--prompt", nargs="+")
    g.add_argument("--cols", type=training.count(1, 64), default=8)
    g.add_argument("--scale", type=training.count(1, 16), default=3)
    g.add_argument("--seed", type=training.SEED, default=0)
    g.set_defaults(func=_cmd_grid)


def main(argv=None):
    training.run_commands("python -m mlx_starflow.demo_text", __doc__, _commands, argv)
