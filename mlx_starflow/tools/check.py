"""A self-check for the device a user has: every model path on the default device and again
on MLX's CPU, and the largest difference between the two.

Each case builds a tiny model with random weights (seeded, built on the CPU stream so both
sides hold the same numbers), applies the device's measures as the loaders do
(`device.prepare`: on a CPU the input-major layout and float32 quantized products), runs
one path and returns its output. The shipped demo runs through the Pipeline as
`generate` runs it, and its images per second are timed on the default device.

On a Mac the default device is Metal, so this checks Metal against the CPU; where MLX has
CUDA, CUDA. On a machine with only a CPU both sides are the CPU: the differences are then
those of running the same thing twice (zero), which keeps the check itself tested.
"""

import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import gemma2

from ..loading import device
from ..loading.text import TextEncoder
from ..models.vae import VAE, VAEConfig
from ..pipeline import Pipeline
from ..sample import Jacobi, invert, sample
from . import machine
from .random_models import ARCHS, flow_config, random_flow, random_t5, randomize

ARCH = "tiny"
SEED = 0
# A case differs when its largest difference exceeds this share of its largest value.
TOLERANCE = {"sample": 1e-2, "pass": 1e-3}


@dataclass
class Case:
    name: str
    what: str
    run: Callable  # () -> mx.array, run with the side's default device
    kind: str = "pass"  # "sample" (an autoregressive inversion, which compounds) or "pass"


@dataclass
class Row:
    name: str
    what: str
    max_diff: Optional[float] = None
    relative: Optional[float] = None
    tolerance: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.relative is not None and self.relative <= self.tolerance


@dataclass
class Report:
    device: str
    other: str
    machine: dict
    rows: List[Row] = field(default_factory=list)
    demo_images_per_second: Optional[float] = None
    demo_images: int = 0
    peak_memory: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)


def _on_cpu(fn):
    """Build on the CPU stream: the same random numbers whatever the default device."""
    with mx.stream(mx.cpu):
        out = fn()
        mx.eval(out if isinstance(out, mx.array) else [])
        return out


def _flow(quantize=None):
    def build():
        flow, _ = random_flow(flow_config(ARCH), mx.float32, quantize, seed=SEED)
        return flow

    flow = _on_cpu(build)
    return device.prepare(flow)  # as the loaders do, for the side's device


def _inputs(flow, guided=True, batch=2):
    cfg = flow.config

    def build():
        noise = mx.random.normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels), key=mx.random.key(1))
        rows = 2 * batch if guided else batch
        y = 0.5 * mx.random.normal((rows, cfg.txt_size, cfg.txt_dim), key=mx.random.key(2))
        mx.eval(noise, y)
        return noise, y

    return _on_cpu(build)


def _sample(jacobi=None, quantize=None, kv_bits=None):
    def run():
        flow = _flow(quantize)
        noise, y = _inputs(flow)
        kw = {"kv_bits": kv_bits} if kv_bits else {}
        return sample(flow, noise, y, 2.0, jacobi=jacobi, **kw)

    return run


def _score():
    flow = _flow()
    x, y = _inputs(flow, guided=False)
    return flow.bits_per_dim(x, y)


def _invert():
    flow = _flow()
    x, y = _inputs(flow)
    return invert(flow, x, y, 2.0)


def _denoise():
    flow = _flow()
    x, y = _inputs(flow, guided=False)
    return flow.denoise(x, y)


def _ids(vocab, rows=2, length=8):
    def build():
        ids = mx.random.randint(1, vocab, (rows, length), key=mx.random.key(3))
        mask = (mx.arange(length)[None] < mx.array([[length], [length // 2]])).astype(mx.int32)
        return ids, mask

    return _on_cpu(build)


def _t5():
    t5 = device.prepare(_on_cpu(lambda: random_t5(ARCH, seed=SEED)))
    ids, mask = _ids(ARCHS[ARCH]["t5"]["vocab_size"])
    return t5(ids, mask) * mask[..., None]


# A Gemma 2 text encoder of a few layers (sliding window and full attention), mlx-lm's model.
GEMMA = dict(
    model_type="gemma2",
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
    vocab_size=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    sliding_window=4,
    query_pre_attn_scalar=16,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)


def _gemma():
    def build():
        model = randomize(gemma2.Model(gemma2.ModelArgs.from_dict(GEMMA)), mx.float32, SEED)
        mx.eval(model.parameters())
        return model

    model = device.prepare(_on_cpu(build))
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(GEMMA["num_hidden_layers"])]
    with tempfile.TemporaryDirectory() as empty:  # no tokenizer: ids are given
        enc = TextEncoder("gemma2", "hidden", model, Path(empty), 8, GEMMA["hidden_size"], dict(GEMMA), types)
    ids, mask = _ids(GEMMA["vocab_size"])
    return enc.encode_ids(np.array(ids), np.array(mask))


def _vae():
    def build():
        vae = randomize(VAE(VAEConfig(**ARCHS[ARCH]["vae"])), mx.float32, SEED)
        mx.eval(vae.parameters())
        lat = mx.random.normal((1, 8, 8, vae.config.latent_channels), key=mx.random.key(4))
        img = mx.random.uniform(-1, 1, (1, 32, 32, 3), key=mx.random.key(5))
        return vae, lat, img

    vae, lat, img = _on_cpu(build)
    device.prepare(vae)
    mean = vae.encode(img)
    return mx.concatenate([vae.decode(lat).reshape(-1), mean.reshape(-1)])


def cases() -> List[Case]:
    jac = Jacobi(block_size=16, threshold=1e-4, max_iter=32)
    return [
        Case("flow sequential", "tiny STARFlow, guidance 2, token by token", _sample(), "sample"),
        Case("flow Jacobi", "the same, Jacobi chunks of 16", _sample(jac), "sample"),
        Case(
            "flow 8-bit",
            "the same with 8-bit weights, token by token",
            _sample(quantize={"bits": 8, "group_size": 64}),
            "sample",
        ),
        Case("flow 8-bit KV cache", "float32 weights, the deep block's cache at 8 bits", _sample(kv_bits=8), "sample"),
        Case("score", "bits per dimension, one density pass", _score),
        Case("invert", "editing's guided inversion (guidance 2)", _invert),
        Case("denoise", "the score step (a gradient of the density)", _denoise),
        Case("T5", "T5 encoder, padded prompts", _t5),
        Case("Gemma", "Gemma 2 text encoder (mlx-lm), sliding window", _gemma),
        Case("SD-VAE", "decode 8x8 latents, encode a 32x32 image", _vae),
    ]


def _demo(images: int):
    pipe = Pipeline.from_pretrained("demo")
    prompts = pipe.classes.labels[:images]
    prompts = (prompts * images)[:images]
    return pipe, prompts


# The pipeline resets MLX's peak at each of its stages and returns its own: kept here.
_PIPELINE_PEAKS = []


def _demo_latents(images: int):
    pipe, prompts = _demo(images)
    result = pipe.generate(prompts, seed=7, denoise="none")
    _PIPELINE_PEAKS.append(result.peak_memory)
    return result.latents


def device_name(dev) -> str:
    dev = mx.Device(dev) if not isinstance(dev, mx.Device) else dev
    if dev.type == mx.cpu:
        return "CPU"
    if mx.metal.is_available():
        return "GPU (Metal)"
    return "GPU (CUDA)" if hasattr(mx, "cuda") and mx.cuda.is_available() else "GPU"


def _on(dev, fn, peaks: list):
    old = mx.default_device()
    mx.set_default_device(dev)
    mx.reset_peak_memory()
    try:
        out = fn()
        mx.eval(out)
        peaks.append(mx.get_peak_memory())
        return np.array(out.astype(mx.float32))
    finally:
        mx.set_default_device(old)


def _compare(name, what, kind, fn, main, other, peaks) -> Row:
    row = Row(name, what, tolerance=TOLERANCE[kind])
    try:
        a, b = _on(main, fn, peaks), _on(other, fn, peaks)
    except Exception as e:  # a path that fails on one device is what the check is for
        row.error = f"{type(e).__name__}: {e}"[:200]
        return row
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        row.error = "non-finite values"
        return row
    row.max_diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    row.relative = row.max_diff / max(float(np.max(np.abs(b))), 1e-30)
    return row


def demo_speed(dev, images: int, repeats: int = 2) -> float:
    """Images per second of the shipped demo (`generate`'s path, one batch) on `dev`, after a warm-up."""
    old = mx.default_device()
    mx.set_default_device(dev)
    try:
        pipe, prompts = _demo(images)
        _PIPELINE_PEAKS.append(pipe.generate(prompts, seed=1).peak_memory)
        best = float("inf")
        for r in range(repeats):
            t = time.perf_counter()
            pipe.generate(prompts, seed=2 + r)
            best = min(best, time.perf_counter() - t)
        return images / best
    finally:
        mx.set_default_device(old)


def run_check(images: int = 8, log=None) -> Report:
    """Every case on the default device and on the CPU; the demo's speed on the default device."""
    t0 = time.perf_counter()
    main, other = mx.default_device(), mx.Device(mx.cpu)
    report = Report(device_name(main), device_name(other), machine.machine_info())
    _PIPELINE_PEAKS.clear()
    peaks = []
    all_cases = [
        Case(
            "demo",
            f"the shipped demo, {min(images, 4)} images as generate makes them",
            lambda: _demo_latents(min(images, 4)),
            "sample",
        )
    ] + cases()
    for c in all_cases:
        if log:
            log(f"  {c.name} ...")
        report.rows.append(_compare(c.name, c.what, c.kind, c.run, main, other, peaks))
    if log:
        log("  demo speed ...")
    report.demo_images = images
    report.demo_images_per_second = demo_speed(main, images)
    report.peak_memory = max(peaks + _PIPELINE_PEAKS, default=0)
    report.seconds = time.perf_counter() - t0
    return report


def _fmt(x):
    return "-" if x is None else "0" if x == 0 else f"{x:.1e}"


def table(report: Report) -> List[str]:
    """The lines to paste into an issue (Markdown)."""
    m = report.machine
    mem = f"{m['memory'] / 1e9:.1f} GB" if m.get("memory") else "?"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    same = (
        " (both sides the CPU: MLX has no GPU here, so this checks the check)" if report.device == report.other else ""
    )
    out = [
        "mlx-starflow self-check",
        "",
        f"- device: {report.device} against {report.other}{same}",
        f"- chip: {m['chip'] or platform.processor() or '?'} ({m['cpus']} cpus), memory {mem}",
        f"- {versions}; Python {m['python']}; {m['os']}",
        "",
        "| case | what runs | largest difference | relative | tolerance | |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        verdict = "ok" if r.ok else ("ERROR: " + r.error if r.error else "DIFFERS")
        out.append(f"| {r.name} | {r.what} | {_fmt(r.max_diff)} | {_fmt(r.relative)} | {r.tolerance:.0e} | {verdict} |")
    ips = report.demo_images_per_second
    out += [
        "",
        f"- demo: {ips:.2f} images per second on {report.device} ({report.demo_images} 32x32 images in one "
        "batch, after a warm-up, best of 2)"
        if ips
        else "- demo: not timed",
        f"- peak memory (MLX, the largest case): {report.peak_memory / 1e6:.0f} MB; the whole check took "
        f"{report.seconds:.0f} s",
        f"- result: {'every case agrees' if report.ok else 'SOME CASES DIFFER OR FAIL (see the table)'}",
    ]
    return out
