"""Parity runner of the `starflow-video` fixtures: model.pth + config.yaml through
convert_starflow_video and load_video_flow, each case of cases.json on inputs.npz,
outputs in the reference layout (video latents (B, T, C, H, W)). Never reads expected.npz."""

from pathlib import Path

import numpy as np


def _cl(a):
    """(B, T, C, H, W) -> channels-last (B, T, H, W, C)."""
    import mlx.core as mx

    return mx.array(a).transpose(0, 1, 3, 4, 2)


def _ref(a):
    return np.array(a.transpose(0, 1, 4, 2, 3))


def run(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    import mlx.core as mx

    from mlx_starflow.loading.video import convert_starflow_video, load_video_flow
    from mlx_starflow.sample import Jacobi
    from mlx_starflow.video_sample import sample_video

    out = tmp / "model"
    convert_starflow_video(fixture / "model.pth", fixture / "config.yaml", out)
    model = load_video_flow(out)
    results = {}
    for case in meta["cases"]:
        args = {k: inputs[v] for k, v in case["inputs"].items()}
        kw = case.get("kwargs", {})
        y = mx.array(args["y"]) if "y" in args else None
        name, op = case["name"], case["op"]
        if op == "forward":
            z, logdet = model(_cl(args["x"]), y)
            results[f"{name}/z"], results[f"{name}/logdet"] = _ref(z), np.array(logdet)
        elif op == "reverse":
            jac = None
            if kw.get("jacobi"):
                jac = Jacobi(kw.get("jacobi_block_size", 16), kw.get("jacobi_th", 1e-3), kw.get("jacobi_max_iter", 32))
            x = sample_video(
                model,
                _cl(args["noise"]),
                y,
                guidance=kw.get("guidance", 0.0),
                jacobi=jac,
                context_length=kw.get("context_length"),
            )
            results[f"{name}/x"] = _ref(x)
        elif op == "learned_denoise":
            results[f"{name}/x"] = _ref(model.learned_denoise(_cl(args["x"]), y))
        else:
            raise ValueError(f"unknown starflow-video op {op!r} in case {name!r}")
    return results
