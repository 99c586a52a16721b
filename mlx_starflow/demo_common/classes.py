"""The class-conditional pixel flows of the image and video demos.

The prompt is one of a fixed list of classes, a one-hot text prefix of one token with
an extra unconditional row for classifier-free guidance (ClassEncoder). Data in
[-1, 1] (8-bit u as u / 127.5 - 1) are noise-augmented, x~ = x + noise_std * eps;
bits/dim are of x~ in 8-bit pixel units: the density of u~ = 127.5 * (x~ + 1) is
p(x~) / 127.5^D, so bpd = -log p(x~) / (D ln 2) + log2(127.5).
"""

import math

import mlx.core as mx
import numpy as np

from ..models.config import FlowConfig
from ..pipeline import ClassEncoder
from ..sample import Jacobi
from .drawing import from_model, to_model

LOG2_SCALE = math.log2(127.5)  # [-1, 1] -> 8-bit levels, per dimension
HELD_OUT_SEED = 1_000_003  # held-out data for bits/dim: never a training seed
SELECT_SEED = 2_000_003  # noise for choosing the sampling defaults
EVAL_SEED = 3_000_017  # noise for the reported checker accuracy
JACOBI = Jacobi(block_size=16, threshold=1e-3, max_iter=32)


def class_flow_config(
    class_names, size, channels, head_dim, layers, expansion, noise_std, top_channels=None
) -> FlowConfig:
    """Pixel-space STARFlow for size x size RGB with `class_names` as its prompts: 4x4
    patches, RoPE, SOS, softplus scales, deep-shallow blocks with the class (a one-hot
    prefix of one token, plus the unconditional row) on the top block only."""
    top = top_channels or channels
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=3,
        input_size=size,
        patch_size=4,
        channels=channels,
        top_channels=top,
        head_dim=head_dim,
        num_heads=channels // head_dim,
        num_kv_heads=channels // head_dim,
        top_num_heads=top // head_dim,
        top_num_kv_heads=top // head_dim,
        layers_per_block=list(layers),
        expansion=expansion,
        rope=True,
        pt_seq_len=size // 4,
        sos=True,
        seq_order="L2R",
        use_softplus=True,
        cond_top_only=True,
        txt_size=1,
        txt_dim=len(class_names) + 1,
        noise_std=noise_std,
        class_names=list(class_names),
        image_size=size,
    )
    cfg.validate()
    return cfg


def class_text(labels, cfg: FlowConfig) -> mx.array:
    """One-hot text prefix (B, 1, classes + 1); label `len(class_names)` is unconditional."""
    return ClassEncoder.for_config(cfg).rows(labels)


def bpd_8bit(nats_per_dim):
    """Bits/dim of 8-bit data from nats/dim of the [-1, 1] density (see the module doc)."""
    return nats_per_dim / math.log(2) + LOG2_SCALE


def sample_classes(model, labels, shape, draw, denoise_step, guidance, sampler, denoise, seed, batch_size):
    """uint8 samples (N, *shape) of the class indices `labels`, in batches; sample i's noise
    depends on `seed` and N only, not on the batching. draw(model, noise, y, guidance, jacobi)
    is the flow's sampler (y: the conditional rows, then the unconditional ones when
    guidance > 0); denoise_step(model, x, y) the score step applied when denoise is "score"."""
    cfg = model.config
    if sampler not in ("sequential", "jacobi"):
        raise ValueError(f"sampler must be 'sequential' or 'jacobi', not {sampler!r}")
    if denoise not in ("score", "none"):
        raise ValueError(f"denoise must be 'score' or 'none', not {denoise!r}")
    labels = np.asarray(labels, dtype=np.int32)
    noise = mx.random.normal((len(labels), *shape), key=mx.random.key(seed))
    uncond = len(cfg.class_names)
    out = []
    for i in range(0, len(labels), batch_size):
        lab = mx.array(labels[i : i + batch_size])
        y = class_text(lab, cfg)
        y_all = mx.concatenate([y, class_text(mx.full(lab.shape, uncond), cfg)]) if guidance > 0 else y
        x = draw(model, noise[i : i + batch_size], y_all, guidance, JACOBI if sampler == "jacobi" else None)
        if denoise == "score":
            x = denoise_step(model, x, y)
        mx.eval(x)
        out.append(from_model(x))
    return np.concatenate(out)


def held_out_bpd(model, data, labels, seed, batch_size) -> float:
    """Bits/dim (8-bit units) of uint8 `data` (N, ...) of classes `labels`, noise-augmented
    with keys from `seed`."""
    cfg = model.config
    n = len(data)
    keys = mx.random.split(mx.random.key(seed), -(-n // batch_size))
    D = math.prod(data.shape[1:])
    total = 0.0
    for k, i in enumerate(range(0, n, batch_size)):
        x = mx.array(to_model(data[i : i + batch_size]))
        x = x + cfg.noise_std * mx.random.normal(x.shape, key=keys[k])
        y = class_text(mx.array(labels[i : i + batch_size].astype(np.int32)), cfg)
        total += (-model.log_prob(x, y)).sum().item()
    return bpd_8bit(total / (n * D))
