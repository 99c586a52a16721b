"""What `--dtype auto` picks for the released 3B on machines of 8 to 64 GB, and the peaks it
expects: computed from loading/precision_policy.py's estimate and the released shapes (nothing
is loaded or measured).

    python -m mlx_starflow.tools.what_fits

The memory the policy is given is an assumption per machine, stated in the output: on a Mac's
GPU the recommended working set (about 2/3 of the memory up to 16 GB, 3/4 above; a Mac
reports its own through mx.device_info()); on a Linux CPU MemAvailable, taken as the memory
less 1.5 GB for the system.
"""

import argparse

from mlx.utils import tree_flatten

from ..loading.precision_policy import GB, Shapes, choose, sizes_of, stage_peaks, whole_peak
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import VAE, VAEConfig
from .random_models import ARCHS, flow_config, flow_spec

MACHINES = (8, 16, 24, 36, 64)


def shapes_3b(arch: str = "3b") -> Shapes:
    """The policy's view of the architecture: its flow, T5 and VAE decoder shapes as float32 folders."""
    flow = sizes_of({k: ("F32", s) for k, s in flow_spec(arch).items()})
    t5 = T5Encoder(T5Config(**ARCHS[arch]["t5"]))
    text = sizes_of({k: ("F32", v.shape) for k, v in tree_flatten(t5.parameters())})
    vae = VAE(VAEConfig(**ARCHS[arch]["vae"]))
    dec = {k: ("F32", v.shape) for k, v in tree_flatten(vae.parameters()) if k.startswith(("decoder.", "post_quant"))}
    return Shapes.of_config(flow_config(arch), flow, text, sizes_of(dec))


def gpu_memory(gb: int) -> float:
    return gb * GB * (2 / 3 if gb <= 16 else 3 / 4)


def cpu_memory(gb: int) -> float:
    return (gb - 1.5) * GB


def row(shapes: Shapes, gb: int, gpu: bool, kv_bits=None) -> dict:
    available = gpu_memory(gb) if gpu else cpu_memory(gb)
    c = choose(shapes, gpu=gpu, available=available, one_shot=True, source="assumed")
    app = whole_peak(stage_peaks(shapes, c.dtype, c.quantize, c.text_dtype, c.text_quantize, gpu), one_shot=False)
    margin = max(1e9, 0.1 * available)
    return {
        "memory_gb": gb,
        "device": "GPU" if gpu else "CPU",
        "available": available,
        "choice": c.label(),
        "one_shot_peak": c.peak,
        "fits": c.peak + margin <= available,
        "resident_peak": app,
        "resident_fits": app + margin <= available,
    }


def table(arch: str = "3b") -> list:
    shapes = shapes_3b(arch)
    lines = [
        "| machine | device: memory assumed for MLX | `auto` picks | peak of `generate` (one-shot) | "
        "peak of an app's resident Pipeline |",
        "|---|---|---|---|---|",
    ]
    for gb in MACHINES:
        for gpu in (True, False):
            r = row(shapes, gb, gpu)
            where = "Mac GPU" if gpu else "Linux CPU"
            fit = "" if r["fits"] else " (does not fit)"
            app = f"{r['resident_peak'] / GB:.1f} GB" + ("" if r["resident_fits"] else " (does not fit: --low-memory)")
            lines.append(
                f"| {gb} GB | {where}: {r['available'] / GB:.1f} GB | {r['choice']} | "
                f"{r['one_shot_peak'] / GB:.1f} GB{fit} | {app} |"
            )
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="3b", choices=list(ARCHS))
    a = p.parse_args(argv)
    print("\n".join(table(a.arch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
