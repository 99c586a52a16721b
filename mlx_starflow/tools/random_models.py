"""Random-weight models of the released shapes, for the benchmark and the tests.

The weights are drawn lazily (MLX arrays are not computed until evaluated) and
evaluated one transformer layer at a time, quantized first when asked: the
machine never holds the model in a wider precision than the one requested, so a
4-bit 3B model is built where a float32 one would not fit.
"""

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..loading.quant import quant_args, quantize_linear
from ..loading.weights import quantize_model
from ..models.config import RELEASED, starflow_config_from_args
from ..models.flow import Flow
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import VAE, VAEConfig

# The released 3B model with its T5-XL encoder and SD-VAE; a small one (float32
# is cheap there: the precision study, the loop timings); a tiny one for tests.
ARCHS = {
    "3b": {
        "flow": RELEASED["starflow_3B_t2i_256x256"],
        "txt_dim": 2048,
        "t5": dict(
            vocab_size=32128,
            d_model=2048,
            d_kv=64,
            num_heads=32,
            d_ff=5120,
            num_layers=24,
            feed_forward_proj="gated-gelu",
        ),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
    },
    "small": {
        "flow": {
            **RELEASED["starflow_3B_t2i_256x256"],
            "img_size": 128,
            "txt_size": 16,
            "channels": 256,
            "layers_per_block": "1 1 1 1 1 4",
        },
        "txt_dim": 256,
        "t5": dict(
            vocab_size=1000, d_model=256, d_kv=64, num_heads=4, d_ff=640, num_layers=4, feed_forward_proj="gated-gelu"
        ),
        "vae": dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, norm_num_groups=32),
    },
    "tiny": {
        "flow": {
            **RELEASED["starflow_3B_t2i_256x256"],
            "img_size": 64,
            "txt_size": 8,
            "channels": 128,
            "blocks": 3,
            "layers_per_block": "1 1 2",
        },
        "txt_dim": 64,
        "t5": dict(
            vocab_size=100, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, feed_forward_proj="gated-gelu"
        ),
        "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=8),
    },
}


def flow_config(arch="3b"):
    a = ARCHS[arch]
    return starflow_config_from_args(a["flow"], txt_dim=a["txt_dim"])


def flow_spec(arch="3b"):
    """{name: shape} of every parameter of the architecture; nothing is allocated."""
    return {k: tuple(v.shape) for k, v in tree_flatten(Flow(flow_config(arch)).parameters())}


def randomize(module, dtype=mx.float32, seed=0):
    """Lazily replace every floating parameter by uniform values of the initialisers'
    scale (+-1/sqrt(fan in)), in `dtype`; norms keep their initial values. Nothing is
    computed until the parameters are evaluated."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), max(len(params), 1))

    def fill(i, path, p):
        if not mx.issubdtype(p.dtype, mx.floating):
            return p
        if path.endswith(("norm.weight", "norm.bias")):
            return p.astype(dtype)
        bound = 1 / math.sqrt(math.prod(p.shape[1:]) if p.ndim > 1 else 64)
        return mx.random.uniform(-bound, bound, p.shape, key=keys[i]).astype(dtype)

    module.update(tree_unflatten([(k, fill(i, k, v)) for i, (k, v) in enumerate(params)]))
    return module


def _evaluate_by_layer(layers, model):
    for layer in layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())


def random_flow(cfg, dtype=mx.float32, quantize=None, seed=0):
    """A Flow of config `cfg` with random weights in `dtype`, its transformer linears
    quantized ({"bits", "group_size"}) by the package's own rule (weights.quantize_model,
    one layer at a time). Returns (model, paths left unquantized)."""
    model = randomize(Flow(cfg), dtype, seed)  # lazy: Flow's own initialisers never run
    skipped = []
    if quantize:
        skipped = quantize_model(model, **quantize)  # evaluates each layer as it goes
        cfg.quantization = dict(quantize)
    _evaluate_by_layer([layer for b in model.blocks for layer in getattr(b, "attn_blocks", [])], model)
    return model, skipped


def random_t5(arch, dtype=mx.float32, quantize=None, seed=0):
    """A T5 encoder of the architecture's text shapes, quantized as t5.load_t5 does."""
    model = randomize(T5Encoder(T5Config(**ARCHS[arch]["t5"])), dtype, seed)
    if quantize:
        quantize_linear(model, **quant_args(quantize))
    _evaluate_by_layer(model.blocks, model)
    return model


def random_vae(arch, dtype=mx.float32, seed=0):
    """The decoder of an SD-VAE of the architecture's shapes (no encoder: generation
    only decodes)."""
    vae = VAE(VAEConfig(**ARCHS[arch]["vae"]))
    vae.encoder = None
    randomize(vae, dtype, seed)
    mx.eval(vae.parameters())
    return vae
