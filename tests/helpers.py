"""Tiny random models for the tests, and reference-format checkpoints of them."""

import signal

import mlx.core as mx
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from mlx_starflow.models.config import starflow_config_from_args
from mlx_starflow.models.flow import Flow

# A miniature of the released 3B recipe: deep-shallow, SOS, softplus, soft clip, final
# norm, text on the deep block only, L2R.
T2I_ARGS = {
    "img_size": 32,
    "txt_size": 5,
    "channel_size": 4,
    "patch_size": 1,
    "channels": 32,
    "head_dim": 24,
    "blocks": 4,
    "layers_per_block": "1 0 1 2",
    "noise_std": 0.3,
    "nvp": 1,
    "rope": 1,
    "sos": 1,
    "seq_order": "L2R",
    "use_softplus": 1,
    "cond_top_only": 1,
    "use_final_norm": 1,
    "vae": "stabilityai/sd-vae-ft-ema",
    "text": "google/flan-t5-xl",
    "cfg": 2.5,
    "soft_clip": 4,
    "batch_size": 64,
    "lr": 1e-4,
}
TXT_DIM = 12


def randomize(model, seed=0, scale=0.2):
    """Random values for every parameter (the reference zero-inits proj_out, which
    would make every block an identity)."""
    rng = np.random.default_rng(seed)
    params = tree_flatten(model.parameters())
    new = [(k, mx.array(rng.normal(0, scale, v.shape).astype(np.float32))) for k, v in params]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def tiny_flow(args=None, txt_dim=TXT_DIM, seed=0, **overrides):
    a = {**T2I_ARGS, **(args or {}), **overrides}
    cfg = starflow_config_from_args(a, txt_dim=txt_dim)
    return randomize(Flow(cfg), seed), a


def save_reference(model, args, directory, extra=None):
    """Write the model as the reference code would: a torch.save state dict (with its
    unused buffers) and a YAML config of `arguments:`."""
    import torch

    sd = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}
    sd["var"] = torch.ones(4, 4)
    sd["blocks.0.attn_mask"] = torch.ones(3, 3)
    sd.update(extra or {})
    ckpt, cfg = directory / "model.pth", directory / "config.yaml"
    torch.save(sd, ckpt)
    cfg.write_text(yaml.safe_dump({"arguments": [{k: v} for k, v in args.items()]}))
    return ckpt, cfg


def rand(shape, seed=1):
    return mx.array(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def default_sigint():
    """Popen preexec_fn: Ctrl-C back to its default in the child. A test runner started in
    the background of a shell ignores SIGINT, its children inherit that, and a test that
    stops a child with SIGINT would wait for it forever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
