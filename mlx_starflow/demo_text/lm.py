"""The text demo's language model: a tiny Gemma-3-architecture LM in mlx-lm's format.

Its tokenizer is a word-level `tokenizers` model over the caption grammar's words
(lower-cased, punctuation split off, <unk> for a word it does not know, <bos>
first, padding on the left as Gemma's), with Gemma's chat-turn tokens so STARFlow's
template (loading/text.py EMBED_TEMPLATE) reads as it does for Gemma. The model is
mlx-lm's gemma3_text with every layer global and RoPE theta 10000, the settings the
flow's LM deep block runs with, so its layers load into that block unchanged
(loading/weights.init_from_lm).

It is pretrained as a language model on the training captions, each wrapped in the
template (as the flow will read them), before the flow is trained.
"""

import json
import math
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from ..demo_common import training
from ..loading.text import EMBED_TEMPLATE
from . import scenes

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PUNCTUATION = [",", ";", ":", "-", ".", "!", "?", "'", '"', "(", ")", "/", "&"]
TEMPLATE_WORDS = ["user", "please", "generate", "about", "model"]


def build_tokenizer() -> Tokenizer:
    words = SPECIAL + PUNCTUATION + sorted(set(TEMPLATE_WORDS + scenes.all_words()))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


TOKENIZER_CONFIG = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "padding_side": "left",
    "add_bos_token": True,
    "model_max_length": 64,
}


def lm_args(vocab_size: int, hidden=96, layers=3, heads=3, kv_heads=1, head_dim=32, mlp=192) -> dict:
    """mlx-lm gemma3_text arguments: all layers global (sliding window beyond any
    prompt), RoPE theta 10000 for both kinds, query scale head_dim^-0.5."""
    return dict(
        model_type="gemma3_text",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=head_dim,
        sliding_window=4096,
        sliding_window_pattern=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def encode(tok: Tokenizer, texts, length: int):
    """Template-wrapped captions -> (ids, mask) right-padded to `length` for LM training."""
    ids = np.zeros((len(texts), length), dtype=np.int32)
    mask = np.zeros((len(texts), length), dtype=np.float32)
    eos = tok.token_to_id("<eos>")
    for i, e in enumerate(tok.encode_batch([EMBED_TEMPLATE.format(prompt=t) for t in texts])):
        row = (e.ids + [eos])[:length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def pretrain(tok: Tokenizer, args: dict, steps=1500, batch_size=64, lr=2e-3, seed=0, length=48, log=print):
    """Train the LM on freshly drawn training captions; returns (model, last losses)."""
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(args))
    model.sanitize({})  # tied embeddings: no lm_head
    mx.eval(model.parameters())
    opt = training.adamw(lr, steps, warmup=min(100, steps // 10 + 1), min_lr_ratio=0.05, weight_decay=0.01)

    def loss_fn(ids, mask):
        logits = model(ids[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
        return (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()

    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(ids, mask):
        loss, grads = nn.value_and_grad(model, loss_fn)(ids, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    losses, tic = [], time.perf_counter()
    for i in range(steps):
        texts = scenes.caption_corpus(batch_size, int(rng.integers(2**31)))
        ids, mask = encode(tok, texts, length)
        loss = step(mx.array(ids), mx.array(mask))
        mx.eval(state, loss)
        losses.append(loss.item())
        if log and ((i + 1) % 250 == 0 or i == steps - 1):
            log(
                f"LM step {i + 1}/{steps}  loss {np.mean(losses[-250:]):.3f} nats/token  "
                f"({time.perf_counter() - tic:.0f} s)"
            )
    return model, losses


def held_out_loss(model, tok, n=512, seed=5_000_011, length=48, held_phrasing=True) -> float:
    """Mean next-token loss (nats) on captions of held-out combinations and phrasings."""
    rng = np.random.default_rng(seed)
    texts = [
        scenes.caption(scenes.random_scene(rng, held=True), rng, held_phrasing=held_phrasing).text for _ in range(n)
    ]
    ids, mask = encode(tok, texts, length)
    ids, mask = mx.array(ids), mx.array(mask)
    logits = model(ids[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
    return ((ce * mask[:, 1:]).sum() / mask[:, 1:].sum()).item()


def save(folder, model, tok: Tokenizer, args: dict, embed_only=False):
    """An mlx-lm folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    embed_only: the token embedding alone (the flow carries the layers)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if embed_only:
        weights = {k: v for k, v in weights.items() if k.startswith("model.embed_tokens.")}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(args, indent=2) + "\n")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


def perplexity(loss: float) -> float:
    return math.exp(loss)


def load(folder):
    """The LM of a folder `save` wrote (all its weights)."""
    args = json.loads((Path(folder) / "config.json").read_text())
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(args))
    weights = mx.load(str(Path(folder) / "model.safetensors"))
    model.sanitize(weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model
