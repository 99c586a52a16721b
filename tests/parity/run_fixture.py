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


def _nhwc(a):
    import mlx.core as mx

    return mx.array(a).transpose(0, 2, 3, 1)


def _nchw(a):
    return np.array(a.transpose(0, 3, 1, 2))


def run_flow(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    import mlx.core as mx

    from mlx_starflow.loading.weights import convert_starflow, convert_tarflow, load_flow
    from mlx_starflow.sample import Jacobi, sample

    out = tmp / "model"
    if meta["format"] == "starflow":
        convert_starflow(fixture / "model.pth", fixture / "config.yaml", out)
    else:
        convert_tarflow(fixture / "model.pth", out, noise_std=meta.get("noise_std"))
    model = load_flow(out)
    tarflow = meta["format"] == "tarflow"
    results = {}
    for case in meta["cases"]:
        args = {k: inputs[v] for k, v in case["inputs"].items()}
        kw = case.get("kwargs", {})
        y = args.get("y")
        if y is not None:
            y = mx.array(y.astype(np.int64) if tarflow else y)
        name, op = case["name"], case["op"]
        if op == "forward":
            z, logdet = model(_nhwc(args["x"]), y)
            results[f"{name}/z"], results[f"{name}/logdet"] = _nchw(z), np.array(logdet)
        elif op == "reverse":
            jac = None
            if kw.get("jacobi"):
                jac = Jacobi(kw.get("jacobi_block_size", 16), kw.get("jacobi_th", 1e-3), kw.get("jacobi_max_iter", 32))
            x = sample(model, _nhwc(args["noise"]), y, guidance=kw.get("guidance", 0.0), jacobi=jac)
            results[f"{name}/x"] = _nchw(x)
        elif op == "denoise":
            results[f"{name}/x"] = _nchw(model.denoise(_nhwc(args["x"]), y, kw.get("noise_std")))
        elif op == "learned_denoise":
            results[f"{name}/x"] = _nchw(model.learned_denoise(_nhwc(args["x"]), y))
        else:
            raise SystemExit(f"unknown op {op!r} in case {name!r}")
    return results


def run_text(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    import mlx.core as mx

    from mlx_starflow.loading.text import load_text_encoder

    # The hf/ folder is what save_pretrained wrote; it loads as published repos do.
    # txt_size only matters for tokenising, which these cases leave out.
    lengths = [inputs[c["inputs"]["input_ids"]].shape[1] for c in meta["cases"]]
    encoder = load_text_encoder(fixture / "hf", txt_size=max(lengths, default=1))
    results = {}
    for case in meta["cases"]:
        if case["op"] != "encode":
            raise ValueError(f"{meta['format']} case {case['name']!r}: unknown op {case['op']!r}")
        names = case["inputs"]
        y = encoder.encode_ids(inputs[names["input_ids"]], inputs[names["attention_mask"]])
        results[f"{case['name']}/y"] = np.array(y.astype(mx.float32))
    encoder.release()
    return results


def run_vae(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    # hf/ is a diffusers folder that load_vae reads as is: nothing to convert.
    import mlx.core as mx

    from mlx_starflow.loading.vae import load_vae

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


from video import run as run_video  # noqa: E402 (beside this file)
from wan_vae import run as run_wan_vae  # noqa: E402 (beside this file)

RUNNERS = {
    "wan2.2-vae": run_wan_vae,
    "starflow-video": run_video,
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
