"""Parity runner of the `wan2.2-vae` fixtures: vae.pth + config.json through
load_wan_vae, each case of cases.json on inputs.npz, outputs in the reference
layout (videos (B, 3, T, H, W), latents (B, C, T, H, W)). Never reads expected.npz."""

import json
from pathlib import Path

import numpy as np

# op -> (its argument, its output's name)
OPS = {"encode": ("x", "z"), "decode": ("z", "x")}


def run(fixture: Path, meta: dict, inputs: dict, tmp: Path) -> dict:
    import mlx.core as mx

    from mlx_starflow.loading.wan_vae import load_wan_vae

    config = json.loads((fixture / "config.json").read_text())
    vae = load_wan_vae(fixture / "vae.pth", config)
    results = {}
    for case in meta["cases"]:
        op = case["op"]
        if op not in OPS:
            raise ValueError(f"unknown wan2.2-vae op {op!r} in case {case['name']!r}")
        arg, out = OPS[op]
        # Reference (B, C, T, H, W) <-> channels-last (B, T, H, W, C).
        value = mx.array(inputs[case["inputs"][arg]]).transpose(0, 2, 3, 4, 1)
        y = getattr(vae, op)(value, **case.get("kwargs", {}))
        results[f"{case['name']}/{out}"] = np.array(y.astype(mx.float32).transpose(0, 4, 1, 2, 3))
    return results
