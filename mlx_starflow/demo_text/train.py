"""Training the text demo: the language model first, then the flow with the LM as its deep block.

    python -m mlx_starflow.demo_text train --out DIR           # LM pretraining, then the flow
    python -m mlx_starflow.demo_text train --out DIR --deep-init scratch   # the comparison run

The flow is a pixel-space STARFlow for 36x36 RGB whose deep block is the
`use_pretrained_lm` layout gemma3_1b with the tiny LM's sizes: its layers initialised
from the pretrained LM (init_from_lm) or at random (`scratch`), the prompt entering as
the LM's token embeddings times sqrt(hidden) after STARFlow's chat template (the
embedding table stays as the LM learnt it). The unconditional prompt is "". By default
the deep block is the whole flow, over 12x12 patches (9 tokens of 432, one per cell of
the scenes' grid): measured in docs/demo.md, unconditional shallow blocks below it
left the text nearly unused at this size. The likelihood is weighted per dimension
(BETA, train_flow) so an object's uncertain edges learn as fast as the rest.
"""

import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..demo_common import training
from ..loading.text import EMBED_TEMPLATE, load_text_encoder, tokenize
from ..loading.weights import init_from_lm
from ..models.config import FlowConfig
from ..models.flow import Flow, IdentityBlock
from . import lm, scenes

TXT_SIZE = 40  # template (11 tokens) + the longest two-object captions
PATCH_SIZES = (4, 6, 12)  # pixels per patch side that tile the 12-pixel cells
PATCH_SIZE = 12  # the recipe: one token per cell
SHALLOW = ()  # the recipe: no shallow blocks, the deep block alone
TRAIN_TABLE = True  # the recipe: the LM's embedding table learns with the flow (train_flow)
BETA = 1.0  # the recipe's likelihood weighting (train_flow): every dimension's mean learns alike


def flow_config(lm_args: dict, channels=64, shallow=SHALLOW, noise_std=0.1, patch_size=PATCH_SIZE) -> FlowConfig:
    cfg = FlowConfig(
        model_type="starflow",
        in_channels=3,
        input_size=scenes.SIZE,
        patch_size=patch_size,
        channels=channels,
        top_channels=lm_args["hidden_size"],
        head_dim=32,
        num_heads=channels // 32,
        num_kv_heads=channels // 32,
        top_num_heads=lm_args["num_attention_heads"],
        top_num_kv_heads=lm_args["num_key_value_heads"],
        top_head_dim=lm_args["head_dim"],
        top_mlp_dim=lm_args["intermediate_size"],
        layers_per_block=list(shallow) + [lm_args["num_hidden_layers"]],
        expansion=2,
        rope=True,
        pt_seq_len=scenes.SIZE // patch_size,
        sos=True,
        seq_order="L2R",
        use_softplus=True,
        cond_top_only=True,
        txt_size=TXT_SIZE,
        txt_dim=lm_args["hidden_size"],
        noise_std=noise_std,
        pretrained_lm="gemma3_1b",
        text_encoder="gemma3_1b",
        image_size=scenes.SIZE,
    )
    cfg.validate()
    return cfg


def weighted_nll(model: Flow, x, y, beta: float):
    """(plain, beta-weighted) negative log-likelihood in nats/dim of images x given text
    y: the top block's per-dimension terms weighted as train_flow's `beta` says, the
    log-determinants of the blocks below it as they are."""
    B, D = x.shape[0], math.prod(x.shape[1:])
    h, w = model.grid(x)
    blocks = [b for b in model.blocks if not isinstance(b, IdentityBlock)]
    top = blocks[-1]
    t, below = model.through(model.patchify(x), y, h, w, blocks=blocks[:-1])
    if top.flip:
        t = t[:, ::-1]
    a, b = top.affine(t, *model.block_args(top, y, B, h, w))
    sigma = top.scale(a)
    z = (t - b) / sigma
    terms = 0.5 * z * z + top.log_scale(a) + 0.5 * math.log(2 * math.pi)
    weight = mx.stop_gradient(sigma ** (2 * beta))
    weight = weight / weight.mean()
    rest = -below.mean() / D
    return terms.mean() + rest, (weight * terms).mean() + rest


init_heads = training.init_identity  # each block starts as the identity, small SOS embeddings


def train_flow(
    model: Flow,
    encoder,
    steps=3000,
    batch_size=32,
    lr=7e-4,
    warmup=200,
    label_drop=0.1,
    seed=0,
    log=print,
    log_every=100,
    stop_after=None,
    beta=0.0,
    train_table=False,
):
    """train_table: the LM's token embedding table (the text encoder) learns with the
    flow, in place in `encoder`, instead of staying as the LM left it.

    beta > 0: each dimension's term of the top block's negative log-likelihood
    weighted by its predicted scale^(2 beta) (held constant, normalised to mean 1), the
    beta-NLL of Seitzer et al. (2022). Plain likelihood training divides the mean's
    gradient by the scale squared, so where the model is unsure (an object's edges)
    its mean learns slowest and stays a blend of shapes; the weighting undoes that. The
    logged loss is the plain one."""
    cfg = model.config
    mx.random.seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    opt = training.adamw(lr, steps, warmup)
    D = cfg.in_channels * cfg.input_size**2
    # The table as the pipeline reads it; read on each call, so a trained one (a parameter
    # of `owner`) is the one differentiated.
    embed = encoder.model.embed_tokens
    owner = _FlowAndTable(model, embed) if train_table else model
    scale = cfg.txt_dim**0.5

    def loss_fn(x, ids):
        y = embed.weight[ids] * scale
        if not beta:
            return -model.log_prob(x, y).mean() / D
        nll, weighted = weighted_nll(model, x, y, beta)
        return weighted, nll  # the first is differentiated, the second logged

    def next_batch():  # label dropout: a share of the captions become the unconditional ""
        images, texts = scenes.make_batch(batch_size, int(rng.integers(2**31)))
        texts = ["" if rng.random() < label_drop else t for t in texts]
        ids, _ = encoder.token_ids(texts)
        return mx.array(scenes.to_model(images)), mx.array(ids)

    gradients = training.noisy_gradients(owner, loss_fn, cfg.noise_std)
    line = partial(training.Progress.line, prefix="flow ", bits=False, rate="{drawn:.1f} img/s")
    losses = training.fit(owner, opt, gradients, next_batch, steps, log, log_every, line, stop_after)
    return model, losses


class _FlowAndTable(nn.Module):
    """The flow and the token embedding table, trained together."""

    def __init__(self, flow, embed):
        super().__init__()
        self.flow, self.embed = flow, embed


def run(
    out,
    deep_init="lm",
    seed=0,
    lm_steps=300,
    steps=700,
    batch_size=32,
    lr=1e-3,
    channels=64,
    log=print,
    lm_folder=None,
    stop_after=None,
    patch_size=PATCH_SIZE,
    shallow=SHALLOW,
    beta=BETA,
    train_table=TRAIN_TABLE,
):
    """The whole recipe; writes out/lm (the pretrained LM, mlx-lm format) and out/model
    (the flow, with text_encoder/: the LM's tokenizer and embedding table). lm_folder:
    an LM this recipe pretrained already (its pretraining is then skipped); stop_after:
    end the flow's training after this many steps (of a schedule for `steps`)."""
    out = Path(out)
    tic = time.perf_counter()
    tok = lm.build_tokenizer()
    args = lm.lm_args(tok.get_vocab_size())
    if lm_folder is None:
        lm_model, lm_losses = lm.pretrain(tok, args, steps=lm_steps, seed=seed, log=log)
        held = lm.held_out_loss(lm_model, tok)
        log(f"LM held-out loss (held-out combinations and phrasings): {held:.3f} nats/token")
        lm.save(out / "lm", lm_model, tok, args)
    else:
        lm_model, lm_losses, held = lm.load(lm_folder), [float("nan")], None
        lm.save(out / "lm", lm_model, tok, args)
    lm_minutes = (time.perf_counter() - tic) / 60

    cfg = flow_config(args, channels=channels, shallow=shallow, patch_size=patch_size)
    mx.random.seed(seed)
    model = Flow(cfg)
    init_heads(model)
    if deep_init == "lm":
        init_from_lm(model, out / "lm")
    log(f"flow: {training.parameter_count(model) / 1e6:.2f}M parameters, deep block from {deep_init}")
    encoder = TokenEncoder(out / "lm", cfg.txt_size)
    tic = time.perf_counter()
    model, losses = train_flow(
        model,
        encoder,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        log=log,
        stop_after=stop_after,
        beta=beta,
        train_table=train_table,
    )
    if train_table:  # the text encoder shipped beside the flow is the table as trained
        lm_model.model.embed_tokens.weight = encoder.model.embed_tokens.weight
    minutes = (time.perf_counter() - tic) / 60
    record = {
        "seed": seed,
        "deep_init": deep_init,
        "lm": {"steps": lm_steps, "final_loss": training.final_loss(lm_losses), "held_out_loss": held},
        "flow": {
            "steps": steps,
            "stop_after": stop_after,
            "batch_size": batch_size,
            "lr": lr,
            "label_drop": 0.1,
            "patch_size": patch_size,
            "shallow_layers": list(shallow),
            "beta": beta,
            "train_table": train_table,
        },
        "losses_per_100_steps": [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)],
        "minutes": {"lm": round(lm_minutes, 1), "flow": round(minutes, 1)},
        "final_loss_nats_per_dim": training.final_loss(losses),
    }
    training.save_folder(out / "model", cfg, model, record, force=True)
    lm.save(out / "model" / "text_encoder", lm_model, tok, args, embed_only=True)
    log(f"saved {out / 'model'} ({minutes:.1f} min of flow training)")
    return out / "model"


class TokenEncoder:
    """The LM folder's tokenizer and token embedding through loading/text.py's Gemma
    embedding mode (the template, left padding), exposing the token ids for training."""

    def __init__(self, folder, txt_size):
        self.enc = load_text_encoder(folder, txt_size=txt_size, mode="embed")
        self.model = self.enc.model

    def token_ids(self, texts):
        return tokenize(self.enc.tokenizer, [EMBED_TEMPLATE.format(prompt=t) for t in texts], self.enc.txt_size)
