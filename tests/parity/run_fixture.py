#!/usr/bin/env python3
"""Run one reference fixture through the project's own code path.

usage: run_fixture.py FIXTURE_DIR OUT.npz

Converts the fixture's reference checkpoint with the project's converter into a
temporary folder, loads it with the project's loader, runs every case of
cases.json on inputs.npz and writes the outputs keyed `<case>/<output>`.
It never reads expected.npz.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def run_flow(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    raise NotImplementedError("flow formats are not implemented yet")


def run_text(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    raise NotImplementedError("text-encoder formats are not implemented yet")


def run_vae(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    # hf/ is a diffusers folder that load_vae reads as is: nothing to convert.
    import mlx.core as mx
    from mlx_starflow.vae import load_vae

    vae = load_vae(fixture / "hf")
    outputs = {"decode": ("z", "x"), "encode": ("x", "z")}
    results = {}
    for case in meta["cases"]:
        op = case["op"]
        if op not in outputs:
            raise ValueError(f"unknown vae op {op!r} in case {case['name']!r}")
        arg, out = outputs[op]
        # Fixtures are NCHW; the MLX VAE is NHWC.
        value = mx.array(inputs[case["inputs"][arg]]).transpose(0, 2, 3, 1)
        y = getattr(vae, op)(value, **case.get("kwargs", {}))
        results[f"{case['name']}/{out}"] = np.array(y.astype(mx.float32).transpose(0, 3, 1, 2))
    return results


RUNNERS = {
    "starflow": run_flow,
    "tarflow": run_flow,
    "t5": run_text,
    "gemma": run_text,
    "vae": run_vae,
}


def main(fixture_dir, out_path):
    fixture = Path(fixture_dir)
    meta = json.loads((fixture / "cases.json").read_text())
    fmt = meta.get("format")
    if fmt not in RUNNERS:
        sys.exit(f"unknown fixture format {fmt!r} in {fixture / 'cases.json'}")
    with np.load(fixture / "inputs.npz") as f:
        inputs = {k: f[k] for k in f.files}
    with tempfile.TemporaryDirectory() as tmp:
        results = RUNNERS[fmt](fixture, meta, inputs, Path(tmp))
    np.savez(out_path, **{k: np.asarray(v, dtype=np.float32) for k, v in results.items()})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
