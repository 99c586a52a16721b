"""What the machine can do, measured: memory copy speed, matrix-multiply speed,
whether MLX's BLAS is a slow one (and how to fix it), and the speed of one of the
model's own layers. The benchmark compares every stage with these limits."""

import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

GB = 1e9

# Debian/Ubuntu's libopenblas0-pthread installs a drop-in libblas under the
# machine's multiarch directory.
_MULTIARCH = {
    "x86_64": "x86_64-linux-gnu",
    "amd64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
    "ppc64le": "powerpc64le-linux-gnu",
    "s390x": "s390x-linux-gnu",
}


def openblas_path(machine=None) -> str:
    m = (machine or platform.machine()).lower()
    return f"/usr/lib/{_MULTIARCH.get(m, m + '-linux-gnu')}/openblas-pthread/libblas.so.3"


# Where the distributions put a system OpenBLAS that exports the BLAS MLX calls: Debian/Ubuntu's
# drop-in libblas (libopenblas0-pthread), Fedora's threaded and plain builds.
FEDORA_OPENBLAS = ("/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0")


def openblas_library() -> Optional[str]:
    """The system OpenBLAS to preload: $MLX_STARFLOW_OPENBLAS if set, else the first of the
    known paths that exists; None without one."""
    named = os.environ.get("MLX_STARFLOW_OPENBLAS")
    if named:
        return named if Path(named).is_file() else None
    return next((p for p in (openblas_path(), *FEDORA_OPENBLAS) if Path(p).is_file()), None)


def times(fn, repeats, warmup=1, budget=float("inf")):
    """Wall times of `repeats` calls after `warmup` calls, stopping once over `budget` seconds."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
        if sum(out) > budget:
            break
    return out


def median_time(fn, repeats=3, budget=5.0):
    return statistics.median(times(fn, repeats, budget=budget))


def copy_speed(repeats=3):
    """Memory copy speed in GB/s (bytes read + written) over 256 MB, far above any
    cache: with MLX and with numpy; `copy_GBps` is the better of the two, the
    limit for streaming weights."""
    n = 64 * 1024 * 1024
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    out = {"mlx_copy_GBps": 2 * a.nbytes / median_time(lambda: mx.eval(a * 1.0), repeats) / GB}
    a = None
    b = np.random.default_rng(0).random(n, dtype=np.float32)
    c = np.empty_like(b)
    out["numpy_copy_GBps"] = 2 * b.nbytes / median_time(lambda: np.copyto(c, b), repeats) / GB
    out["copy_GBps"] = max(out["mlx_copy_GBps"], out["numpy_copy_GBps"])
    return out


def matmul_speed(repeats=3, size=1024):
    """float32 matrix multiply (size^2) in GFLOP/s with MLX and numpy; `slow_blas`
    when MLX's is below a quarter of numpy's (MLX links a reference BLAS)."""
    x = mx.random.normal((size, size))
    mx.eval(x)
    xn = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    flops = 2 * size**3
    out = {
        "mlx_f32_matmul_GFLOPs": flops / median_time(lambda: mx.eval(x @ x), repeats) / GB,
        "numpy_f32_matmul_GFLOPs": flops / median_time(lambda: xn @ xn, repeats) / GB,
    }
    out["slow_blas"] = out["mlx_f32_matmul_GFLOPs"] < 0.25 * out["numpy_f32_matmul_GFLOPs"]
    return out


def layer_speed(layer, step_rows, repeats=3):
    """One linear layer of the model, as the model holds it (precision, quantization,
    layout), alone: GFLOP/s on many rows (the limit for the text prefix and
    denoising) and GB/s of weights read on the sampling step's rows (the limit for a
    token)."""
    quantized = isinstance(layer, nn.QuantizedLinear)
    dtype = layer.scales.dtype if quantized else layer.weight.dtype
    width = layer.weight.shape[1] * (32 // layer.bits if quantized else 1)
    macs = width * layer.weight.shape[0]
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(layer.parameters()))
    # Many rows where the products go through a BLAS (float32 on the CPU, quantized ones on
    # the CPU that dequantize for it: device.CPUQuantizedLinear, or Metal); fewer where MLX's
    # own CPU kernels run (bf16), which would take minutes at 256.
    gpu = mx.default_device() == mx.gpu
    fast = (gpu and not quantized) or (not gpu and (dtype == mx.float32 or quantized))
    out = {}
    for name, rows in (("many", 256 if fast else 32), ("step", step_rows)):
        x = mx.random.normal((rows, width)).astype(dtype)
        mx.eval(x)
        dt = median_time(lambda x=x: mx.eval(layer(x)), repeats, budget=20.0)
        out[f"layer_{name}_rows"] = rows
        out[f"layer_{name}_GFLOPs"] = 2 * rows * macs / dt / GB
        out[f"layer_{name}_GBps"] = weight_bytes / dt / GB
    kind = f"{layer.bits}-bit" if quantized else str(dtype).split(".")[-1]
    out["layer"] = f"{width} -> {layer.weight.shape[0]}, {kind}"
    return out


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    """Chip, cores, memory, OS, device, package versions, LD_PRELOAD, load average."""
    info = {
        "os": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": str(mx.default_device()),
        "versions": {p: _version(p) for p in ("mlx", "mlx-lm", "numpy")},
        "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
    }
    chip = platform.processor()
    try:
        if sys.platform == "darwin":
            chip = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
                ).stdout.strip()
                or chip
            )
        else:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["chip"] = chip
    if hasattr(os, "getloadavg"):  # other work on the machine skews every timing
        info["load_average"] = os.getloadavg()
    info["cpus"] = os.cpu_count()
    try:
        info["memory"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        info["memory"] = None
    if mx.metal.is_available():
        d = mx.metal.device_info()
        info["chip"] = d.get("device_name", info["chip"])
        info["memory"] = d.get("memory_size", info["memory"])
    return info


def blas_advice(command="python -m mlx_starflow.generate ...") -> str:
    """How to fix a slow float32 matrix multiply on this machine, with the exact steps."""
    if sys.platform == "darwin":
        return (
            "MLX's float32 matrix multiply is far slower than numpy's: MLX should use Accelerate; "
            "reinstall it (pip install -U mlx)."
        )
    path = openblas_path()
    have = " (installed here)" if Path(path).exists() else ""
    return (
        "MLX's float32 matrix multiply is far slower than numpy's: MLX's Linux wheel links the "
        "reference BLAS. To fix it:\n"
        f"  1. install OpenBLAS{have}: sudo apt install libopenblas0-pthread (Debian/Ubuntu)\n"
        "  2. run with it preloaded (the same for generate):\n"
        f"     LD_PRELOAD={path} {command}\n"
        "  Intel's MKL is faster still on the token loop (README, Memory and speed)."
    )


# Libraries of an optimised BLAS, as they appear in a process's mapped files.
OPTIMISED_BLAS = ("openblas", "libmkl", "libblis", "armpl", "accelerate")


def loaded_blas(maps: str = "/proc/self/maps") -> dict:
    """Which BLAS this process has mapped (Linux): {"optimised": the library's path or None,
    "reference": MLX's bundled reference libblas's path or None}. Read from the mapped files,
    so it sees an LD_PRELOAD; on another system both are None."""
    out = {"optimised": None, "reference": None}
    try:
        paths = {line.split()[-1] for line in Path(maps).read_text().splitlines() if "/" in line}
    except OSError:
        return out
    for p in sorted(paths):
        name = Path(p).name.lower()
        if "scipy_openblas" in name:  # numpy's own, with suffixed symbols: never MLX's
            continue
        if any(k in p.lower() for k in OPTIMISED_BLAS) and ("blas" in name or "mkl" in name or "blis" in name):
            out["optimised"] = out["optimised"] or p
        elif name.startswith("libblas") and "mlx" in p.lower():
            out["reference"] = out["reference"] or p
    return out


def reference_blas() -> bool:
    """MLX on Linux running its bundled reference BLAS (no optimised one loaded): float32
    products 4-10x slower than with OpenBLAS (BENCHMARKS.md)."""
    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        return False
    blas = loaded_blas()
    return blas["reference"] is not None and blas["optimised"] is None


def blas_command(command: str = "python -m mlx_starflow.generate ...") -> str:
    """The one command line that runs `command` with OpenBLAS (installing it first when missing)."""
    path = openblas_path()
    run = f"LD_PRELOAD={path} {command}"
    return run if Path(path).exists() else f"sudo apt install libopenblas0-pthread && {run}"


def blas_note(command: str = "python -m mlx_starflow.generate ...") -> str:
    """The short note a command prints when MLX runs its reference BLAS."""
    return (
        "note: MLX is running its bundled reference BLAS (no optimised BLAS loaded): float32 on this CPU is "
        f"4-10x slower than it could be. Faster (Debian/Ubuntu):\n  {blas_command(command)}"
    )
