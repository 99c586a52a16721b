"""The flow: STARFlow and TarFlow transformer autoregressive flows.

The model only: layers, the density direction (data -> noise with its exact
log-determinant), one decoding step over a KV cache, cache creation. Sampling
(the guidance rule, the token and Jacobi loops) is in sample.py. Arrays are
channels-last: images and latents are (B, H, W, C); tokens are (B, N, D) in
natural order.
"""

import dataclasses
import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache
from .config import LM_LAYOUTS, FlowConfig
from .rope import apply_rope, apply_rope_half, rope_table, rope_table_1d

INV_SOFTPLUS_1 = 0.541324854612918  # softplus(0 + this) == 1: a zero output means unit scale
# Query positions of a layer recomputed at a time in the score step's backward pass
# (layer_vjp): bounds the attention scores and MLP units held (BENCHMARKS.md).
DENOISE_ROWS = 256


class RMSNorm(nn.Module):
    """RMSNorm with a unit offset on the weight, computed in float32."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        w = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), w, self.eps).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-5), computed in float32 whatever the weights are."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        f32 = mx.float32
        y = mx.fast.layer_norm(x.astype(f32), self.weight.astype(f32), self.bias.astype(f32), self.eps)
        return y.astype(x.dtype)


def make_norm(cfg: FlowConfig, dims: int):
    return RMSNorm(dims) if cfg.norm_type == "rms_norm" else LayerNorm(dims)


class Attention(nn.Module):
    def __init__(self, cfg: FlowConfig, channels: int, heads: int, kv_heads: int, causal: bool, rotate_half=False):
        super().__init__()
        hd = cfg.head_dim
        self.norm = make_norm(cfg, channels)
        self.qkv = nn.Linear(channels, (heads + 2 * kv_heads) * hd, bias=cfg.use_bias)
        self.proj = nn.Linear(heads * hd, channels, bias=cfg.use_bias)
        if cfg.use_qk_norm:
            self.query_norm = RMSNorm(hd)
            self.key_norm = RMSNorm(hd)
        if cfg.use_post_norm:
            self.post_norm = RMSNorm(channels)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hd
        self.causal = causal
        self.scale = hd**-0.5
        self.rotate = apply_rope_half if rotate_half else apply_rope

    def project(self, x, rope=None):
        """Queries, keys and values of x (B, T, C), each (B, heads, T, head_dim)."""
        B, T, _ = x.shape
        h, kvh, hd = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(self.norm(x))
        q, k, v = mx.split(qkv, [h * hd, (h + kvh) * hd], axis=-1)
        q = q.reshape(B, T, h, hd).transpose(0, 2, 1, 3)
        k = k.reshape(B, T, kvh, hd).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, kvh, hd).transpose(0, 2, 1, 3)
        if "query_norm" in self:
            q, k = self.query_norm(q), self.key_norm(k)
        if rope is not None:
            q, k = self.rotate(q, *rope), self.rotate(k, *rope)
        return q, k, v

    def attend(self, q, k, v):
        """The output rows of queries q over keys and values k, v; causal, the queries are
        the last positions of the keys (as a cached chunk, or a chunk of rows, needs)."""
        B, _, T, _ = q.shape
        mask = "causal" if self.causal and T > 1 else None
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = self.proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))
        return self.post_norm(o) if "post_norm" in self else o

    def __call__(self, x, rope=None, cache: Optional[KVCache] = None):
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(k, v)
        return self.attend(q, k, v)


class MLP(nn.Module):
    def __init__(self, cfg: FlowConfig, channels: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or int(channels * cfg.expansion)
        self.norm = make_norm(cfg, channels)
        self.swiglu = cfg.use_swiglu
        if cfg.use_swiglu:
            self.gate_proj = nn.Linear(channels, hidden, bias=cfg.use_bias)
            self.up_proj = nn.Linear(channels, hidden, bias=cfg.use_bias)
            self.down_proj = nn.Linear(hidden, channels, bias=cfg.use_bias)
        else:
            self.main = [
                nn.Linear(channels, hidden, bias=cfg.use_bias),
                nn.GELU(),
                nn.Linear(hidden, channels, bias=cfg.use_bias),
            ]
        if cfg.use_post_norm:
            self.post_norm = RMSNorm(channels)

    def __call__(self, x):
        x = self.norm(x)
        if self.swiglu:
            x = self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))
        else:
            x = self.main[2](self.main[1](self.main[0](x)))
        return self.post_norm(x) if "post_norm" in self else x


class Layer(nn.Module):
    def __init__(self, cfg, channels, heads, kv_heads, causal=True, hidden=None, rotate_half=False):
        super().__init__()
        self.attention = Attention(cfg, channels, heads, kv_heads, causal, rotate_half)
        self.mlp = MLP(cfg, channels, hidden)

    def __call__(self, x, rope=None, cache=None, mlp=None):
        x = x + self.attention(x, rope, cache)
        return x + self.mlp(x) if mlp is None else mlp(x)


def _chunk_output(layer: Layer, xc, qc, k, v):
    """A layer's output rows for its input rows xc, their queries qc, and the keys and
    values they attend to."""
    h = xc + layer.attention.attend(qc, k, v)
    return h + layer.mlp(h)


def _chunks(T: int, rows: int):
    for start in range(0, T, rows):
        yield start, min(start + rows, T)


def _project(attn: Attention, x, rope, rows: int):
    """Queries, keys and values of every position, `rows` positions at a time (the
    projection is row by row)."""
    parts = []
    for start, end in _chunks(x.shape[1], rows):
        parts.append(attn.project(x[:, start:end], _rows(rope, start, end)))
        mx.eval(parts[-1])
    return [mx.concatenate(p, axis=2) for p in zip(*parts)]


def layer_forward(layer: Layer, x, rope=None, rows: Optional[int] = None):
    """layer(x, rope), `rows` query positions at a time (the attention scores and MLP
    units of only those rows held); whole without `rows`."""
    T = x.shape[1]
    if rows is None or rows >= T:
        return layer(x, rope)
    q, k, v = _project(layer.attention, x, rope, rows)
    outs = []
    for start, end in _chunks(T, rows):
        keys = end if layer.attention.causal else T
        outs.append(_chunk_output(layer, x[:, start:end], q[:, :, start:end], k[:, :, :keys], v[:, :, :keys]))
        mx.eval(outs[-1])
    return mx.concatenate(outs, axis=1)


def layer_vjp(layer: Layer, x, g, rope=None, rows: Optional[int] = None):
    """The cotangent of a layer's input x (B, T, C) from its output's g: the layer
    recomputed from x and differentiated alone. With `rows`, `rows` query positions at a
    time, so the attention scores, MLP units and projections of only those rows are held:
    the queries, keys and values of every position are computed first (row by row), each
    chunk's output rows (over the keys up to its last row when causal) are differentiated
    with respect to its rows of x and q and the keys and values it reads, and the keys'
    and values' cotangents, summed over the chunks in float32, go back through the
    projection last, row by row. The same gradient as one vjp, to rounding."""
    T = x.shape[1]
    if rows is None or rows >= T:
        _, (gx,) = mx.vjp(lambda v: layer(v, rope), [x], [g])
        return gx
    attn = layer.attention
    q, k, v = _project(attn, x, rope, rows)
    gxs, gqs = [], []
    gk, gv = mx.zeros(k.shape, mx.float32), mx.zeros(v.shape, mx.float32)
    for start, end in _chunks(T, rows):
        keys = end if attn.causal else T
        _, (gxc, gqc, gkc, gvc) = mx.vjp(
            lambda *a: _chunk_output(layer, *a),
            [x[:, start:end], q[:, :, start:end], k[:, :, :keys], v[:, :, :keys]],
            [g[:, start:end]],
        )
        pad = [(0, 0), (0, 0), (0, T - keys), (0, 0)]
        gk, gv = gk + mx.pad(gkc.astype(mx.float32), pad), gv + mx.pad(gvc.astype(mx.float32), pad)
        gxs.append(gxc)
        gqs.append(gqc)
        mx.eval(gk, gv, gxc, gqc)
    del q
    gk, gv = gk.astype(k.dtype), gv.astype(v.dtype)
    del k, v
    for i, (start, end) in enumerate(_chunks(T, rows)):
        r = _rows(rope, start, end)
        _, (gp,) = mx.vjp(
            lambda u, r=r: list(attn.project(u, r)),
            [x[:, start:end]],
            [gqs[i], gk[:, :, start:end], gv[:, :, start:end]],
        )
        gxs[i] = gxs[i] + gp
        mx.eval(gxs[i])
    return mx.concatenate(gxs, axis=1)


def _rows(rope, start, end):
    return None if rope is None else (rope[0][start:end], rope[1][start:end])


class FlowBlock(nn.Module):
    """One autoregressive flow block (the reference's MetaBlock)."""

    def __init__(self, cfg: FlowConfig, index: int):
        super().__init__()
        top = index == cfg.num_blocks - 1
        ch = cfg.top_channels if top else cfg.channels
        heads = cfg.top_num_heads if top else cfg.num_heads
        kv_heads = cfg.top_num_kv_heads if top else cfg.num_kv_heads
        D = cfg.token_dim
        self.proj_in = nn.Linear(D, ch)
        self.proj_out = nn.Linear(ch, 2 * D if cfg.nvp else D)
        if cfg.sos:
            self.sos_embed = mx.zeros((1, 1, D))
        if not cfg.rope:
            self.pos_embed = mx.zeros((cfg.num_tokens, ch))
        if cfg.num_classes:
            self.class_embed = mx.zeros((cfg.num_classes, 1, ch))
        if cfg.block_has_text(index):
            self.proj_txt = nn.Linear(cfg.txt_dim, ch)
        self.attn_blocks = [Layer(cfg, ch, heads, kv_heads) for _ in range(cfg.layers_per_block[index])]
        if cfg.use_final_norm:
            self.final_norm = RMSNorm(ch)
        self.flip = cfg.flipped(index)
        self.has_text = cfg.block_has_text(index)
        self.sos = cfg.sos
        self.softplus = cfg.use_softplus
        self.soft_clip = cfg.soft_clip
        self.nvp = cfg.nvp
        self.linear_guidance = cfg.model_type == "tarflow"
        self.kv_heads, self.head_dim = kv_heads, cfg.head_dim

    # -- pieces shared by density and sampling ---------------------------------

    def embed(self, tokens, start, cond):
        """Input projection of the inputs at (permuted) positions start.., plus
        learned position and class embeddings where the model has them."""
        h = self.proj_in(tokens.astype(self.proj_in.weight.dtype))
        if "pos_embed" in self:
            pe = self.pos_embed[::-1] if self.flip else self.pos_embed
            h = h + pe[start : start + tokens.shape[1]]
        if cond is not None:
            h = h + cond
        return h

    def text_prefix(self, text):
        return self.proj_txt(text.astype(self.proj_txt.weight.dtype))

    def head(self, h):
        """Final norm and output projection -> (a, b) in float32."""
        if "final_norm" in self:
            h = self.final_norm(h)
        out = self.proj_out(h)
        if self.soft_clip > 0:
            out = self.soft_clip * mx.tanh(out / self.soft_clip)
        out = out.astype(mx.float32)
        if not self.nvp:
            return mx.zeros_like(out), out
        a, b = mx.split(out, 2, axis=-1)
        return a, b

    def scale(self, a):
        return nn.softplus(a + INV_SOFTPLUS_1) if self.softplus else mx.exp(a)

    def log_scale(self, a):
        return mx.log(nn.softplus(a + INV_SOFTPLUS_1)) if self.softplus else a

    def class_rows(self, labels, batch, unconditional=False, sampling=False):
        """Class embedding rows (B, 1, width): the mean embedding where there is no
        label (unconditional pass, or a negative label in the density).

        When sampling, apple/ml-tarflow indexes `class_embed[y]` as is, so a negative
        label counts from the end (-1 is the last class), as reproduced here."""
        if "class_embed" not in self:
            return None
        mean = self.class_embed.mean(axis=0)
        if labels is None or unconditional:
            return mx.broadcast_to(mean[None], (batch, 1, mean.shape[-1]))
        labels = labels.astype(mx.int32)
        if sampling:
            return self.class_embed[labels % self.class_embed.shape[0]]
        rows = self.class_embed[mx.maximum(labels, 0)]
        return mx.where((labels < 0)[:, None, None], mean[None], rows)

    # -- density -----------------------------------------------------------------

    def layer_input(self, x, text=None, cond=None):
        """The first layer's input for tokens x (B, N, D) in this block's order: the
        start-of-sequence shift, the embeddings, and the text prefix before them."""
        inp = x
        if self.sos:
            sos = mx.broadcast_to(self.sos_embed, (x.shape[0], 1, x.shape[2])).astype(x.dtype)
            inp = mx.concatenate([sos, x[:, :-1]], axis=1)
        h = self.embed(inp, 0, cond)
        if text is not None:
            h = mx.concatenate([self.text_prefix(text), h], axis=1)
        return h

    def affine_of(self, h, n_txt: int):
        """(a, b) for every token from the last layer's output h (n_txt text positions first)."""
        a, b = self.head(h[:, n_txt:])
        if not self.sos:  # output t predicts token t+1; token 0 passes unchanged
            a = mx.pad(a[:, :-1], [(0, 0), (1, 0), (0, 0)])
            b = mx.pad(b[:, :-1], [(0, 0), (1, 0), (0, 0)])
        return a, b

    def rotary(self, rope):
        """This block's rotary table for the flow's `rope` (LMBlock has its own)."""
        return rope

    def affine(self, x, rope=None, text=None, cond=None, recompute=False):
        """(a, b) for every token of x (B, N, D), already in this block's order,
        from one causal pass over the whole sequence: token t's from tokens < t.
        With `recompute`, a gradient through it keeps only each layer's input and
        recomputes the layer's activations (mx.checkpoint)."""
        h = self.layer_input(x, text, cond)
        for layer in self.attn_blocks:
            h = mx.checkpoint(layer)(h, rope) if recompute else layer(h, rope)
        return self.affine_of(h, 0 if text is None else text.shape[1])

    def transform(self, x, a, b):
        """Tokens x (this block's order) and their (a, b) -> (z, per-sample log-det)."""
        z = (x.astype(mx.float32) - b) / self.scale(a)
        return z, -self.log_scale(a).sum(axis=(1, 2))

    def __call__(self, x, rope=None, text=None, cond=None, recompute=False):
        """Data -> noise for tokens x (B, N, D): returns z and the per-sample log-det."""
        if self.flip:
            x = x[:, ::-1]
        z, logdet = self.transform(x, *self.affine(x, rope, text, cond, recompute))
        return (z[:, ::-1] if self.flip else z), logdet

    def vjp_steps(self, x, cotangents=None, rope=None, text=None, cond=None, rows: Optional[int] = None):
        """The gradient with respect to x (B, N, D) of this block's density direction,
        layer by layer: of sum(z * cz) + sum(logdet * cl) for cotangents (cz, cl), or with
        None of the standard normal prior's log p(z) + logdet (the last block).

        A forward pass keeps each layer's input (evaluated one at a time); then, from the
        top, each layer is recomputed and its vector-Jacobian product taken alone
        (layer_vjp, `rows` query rows at a time), so only one layer's activations are ever
        held. Yields after each layer's forward and backward pass; returns the gradient."""
        rope = self.rotary(rope)
        n_txt = 0 if text is None else text.shape[1]

        def order(v):
            return v[:, ::-1] if self.flip else v

        def bottom(v):
            return self.layer_input(order(v), text, cond)

        def top(v, h):
            z, logdet = self.transform(order(v), *self.affine_of(h, n_txt))
            if cotangents is None:
                return [-0.5 * mx.sum(z * z) + mx.sum(logdet)]
            return [order(z), logdet]

        hs = [bottom(x)]
        mx.eval(hs[0])
        for layer in self.attn_blocks:
            hs.append(layer_forward(layer, hs[-1], rope, rows))
            mx.eval(hs[-1])
            yield
        cot = [mx.array(1.0, dtype=mx.float32)] if cotangents is None else cotangents
        _, (gx, g) = mx.vjp(top, [x, hs.pop()], cot)
        mx.eval(gx, g)
        for layer in reversed(self.attn_blocks):
            g = layer_vjp(layer, hs.pop(), g, rope, rows)
            mx.eval(g)
            yield
        _, (g,) = mx.vjp(bottom, [x], [g])
        return gx + g

    # -- sampling -----------------------------------------------------------------

    def step(self, inputs, start, caches, rope, cond, mlps=None):
        """Run inputs at positions start.. through the layers with the caches."""
        h = self.embed(inputs, start, cond)
        n = inputs.shape[1]
        pos = caches[0].offset
        r = _rows(rope, pos, pos + n)
        for i, (layer, cache) in enumerate(zip(self.attn_blocks, caches)):
            h = layer(h, r, cache, None if mlps is None else mlps[i])
        return h if mlps is not None else self.head(h)

    def new_caches(self, batch, length, bits=None):
        """One preallocated KV cache per layer for `length` positions; `bits` (8): keys and
        values quantized (cache.QuantizedKVCache)."""
        dtype = self.proj_in.weight.dtype
        return [make_cache(batch, self.kv_heads, length, self.head_dim, dtype, bits) for _ in self.attn_blocks]

    def prefill(self, text, rope, caches):
        """Feed the text prefix once; only its keys and values are kept."""
        h = self.text_prefix(text)
        r = _rows(rope, 0, text.shape[1])
        for layer, cache in zip(self.attn_blocks, caches):
            h = layer(h, r, cache)
        mx.eval([c.state for c in caches])

    def sos_tokens(self, B):
        """The start-of-sequence input for a batch of B: (B, 1, D)."""
        return mx.broadcast_to(self.sos_embed, (B, 1, self.sos_embed.shape[-1]))


class LMBlock(FlowBlock):
    """The deep block of a `use_pretrained_lm` layout (config.LM_LAYOUTS): a Gemma-
    architecture transformer with the FlowBlock's interface. Its layers are Layers
    with RMSNorm, tanh-GELU SwiGLU of width top_mlp_dim, post-norms, QK-norm where
    the layout has it, no biases and a final norm; RoPE is 1-D over text then image
    positions, rotate-half, of its own head size; the prompt (the LM's scaled token
    embeddings) enters as is, without proj_txt."""

    def __init__(self, cfg: FlowConfig, index: int):
        deep = dataclasses.replace(
            cfg,
            head_dim=cfg.top_head_size,
            rope=True,  # no learned positions: RoPE, or nothing when the model has none
            norm_type="rms_norm",
            use_swiglu=True,
            use_bias=False,
            use_qk_norm=LM_LAYOUTS[cfg.pretrained_lm]["qk_norm"],
            use_post_norm=True,
            use_final_norm=True,
        )
        super().__init__(deep, index)
        if "proj_txt" in self:
            del self["proj_txt"]
        self.attn_blocks = [
            Layer(deep, cfg.top_channels, cfg.top_num_heads, cfg.top_num_kv_heads, True, cfg.top_mlp_dim, True)
            for _ in range(cfg.layers_per_block[index])
        ]

    def rotary(self, rope):
        """This block's 1-D table for the positions of the flow's table `rope` (text
        first, then the image tokens), or None when the model has no RoPE."""
        return None if rope is None else rope_table_1d(self.head_dim, rope[0].shape[0])

    def text_prefix(self, text):
        return text.astype(self.proj_in.weight.dtype)

    def affine(self, x, rope=None, text=None, cond=None, recompute=False):
        return super().affine(x, self.rotary(rope), text, cond, recompute)

    def step(self, inputs, start, caches, rope, cond, mlps=None):
        return super().step(inputs, start, caches, self.rotary(rope), cond, mlps)

    def prefill(self, text, rope, caches):
        return super().prefill(text, self.rotary(rope), caches)


class IdentityBlock(nn.Module):
    """A block with 0 layers: no weights, no change, zero log-det."""

    flip = False
    has_text = False


class Denoiser(nn.Module):
    """The learnable self-denoiser: a non-causal transformer over the tokens
    (with the text prefix when conditional) predicting the noise."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        D = cfg.token_dim
        self.proj_in = nn.Linear(D, cfg.channels)
        self.proj_out = nn.Linear(cfg.channels, D)
        if cfg.conditional_denoiser and cfg.txt_dim:
            self.proj_txt = nn.Linear(cfg.txt_dim, cfg.channels)
        self.attn_blocks = [
            Layer(cfg, cfg.channels, cfg.num_heads, cfg.num_kv_heads, causal=False) for _ in range(cfg.denoiser_layers)
        ]
        if cfg.use_final_norm:
            self.final_norm = RMSNorm(cfg.channels)
        self.has_text = "proj_txt" in self

    def __call__(self, x, rope=None, text=None):
        h = self.proj_in(x.astype(self.proj_in.weight.dtype))
        n_txt = 0
        if text is not None:
            t = self.proj_txt(text.astype(self.proj_txt.weight.dtype))
            n_txt = t.shape[1]
            h = mx.concatenate([t, h], axis=1)
        for layer in self.attn_blocks:
            h = layer(h, rope)
        h = h[:, n_txt:]
        if "final_norm" in self:
            h = self.final_norm(h)
        return self.proj_out(h).astype(mx.float32)


def check_text(cfg, y, batch: int):
    """y as a flow of config cfg takes its text (None without text), or a ValueError saying its shape."""
    if cfg.txt_dim == 0:
        return None
    if y is None or y.ndim != 3 or y.shape[-1] != cfg.txt_dim:
        raise ValueError(
            f"text embeddings must be (batch, tokens, {cfg.txt_dim}), got {None if y is None else tuple(y.shape)}"
        )
    if y.shape[0] != batch:
        raise ValueError(f"{y.shape[0]} rows of text embeddings for a batch of {batch}")
    return y


def log_normal(z):
    """log N(z; 0, I) per sample, summed over every axis but the first."""
    D = math.prod(z.shape[1:])
    return -0.5 * mx.sum(mx.square(z).reshape(z.shape[0], -1), axis=1) - 0.5 * D * math.log(2 * math.pi)


class Flow(nn.Module):
    """A STARFlow or TarFlow model."""

    def __init__(self, cfg: FlowConfig, deep: Optional[nn.Module] = None, shallow: bool = True):
        """deep: the top block to use instead of a FlowBlock (a pipeline rank's share of it);
        without `shallow`, the other blocks and the denoiser are left out (identities)."""
        super().__init__()
        top = cfg.num_blocks - 1
        self.blocks = [
            (LMBlock if cfg.pretrained_lm and i == top else FlowBlock)(cfg, i)
            if n > 0 and (shallow or i == top)
            else IdentityBlock()
            for i, n in enumerate(cfg.layers_per_block)
        ]
        if deep is not None:
            self.blocks[top] = deep
        if cfg.learnable_self_denoiser and shallow:
            self.learnable_self_denoiser = Denoiser(cfg)
        self._config = cfg

    @property
    def config(self) -> FlowConfig:
        return self._config

    # -- layout ------------------------------------------------------------------

    def patchify(self, x):
        """(B, H, W, C) -> tokens (B, N, p*p*C), row-major over patches."""
        B, H, W, C = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image {H}x{W} is not a multiple of the patch size {p}")
        x = x.reshape(B, H // p, p, W // p, p, C)
        # STARFlow orders a patch (row, col, channel); TarFlow (channel, row, col) as torch's unfold.
        order = (0, 1, 3, 5, 2, 4) if self.config.model_type == "tarflow" else (0, 1, 3, 2, 4, 5)
        return x.transpose(order).reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, tokens, h, w):
        """Tokens of an h x w patch grid -> (B, h*p, w*p, C)."""
        B = tokens.shape[0]
        p, C = self.config.patch_size, self.config.in_channels
        if self.config.model_type == "tarflow":
            x = tokens.reshape(B, h, w, C, p, p).transpose(0, 1, 4, 2, 5, 3)
        else:
            x = tokens.reshape(B, h, w, p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(B, h * p, w * p, C)

    def grid(self, x):
        p = self.config.patch_size
        return x.shape[1] // p, x.shape[2] // p

    def rope(self, has_text, h, w, txt_len):
        cfg = self.config
        if not cfg.rope:
            return None
        return rope_table(cfg.head_dim, h, w, txt_len if has_text else 0, cfg.txt_size > 0, cfg.pt_seq_len)

    def check_input(self, x, name):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{name} must be (batch, height, width, {cfg.in_channels}), got shape {tuple(x.shape)}")
        h, w = self.grid(x)
        if not cfg.rope and h * w != cfg.num_tokens:
            raise ValueError(
                f"{name} must be {cfg.input_size}x{cfg.input_size} for this model "
                f"(learned positions), got {x.shape[1]}x{x.shape[2]}"
            )

    def check_text(self, y, batch):
        return check_text(self.config, y, batch)

    # -- density -------------------------------------------------------------------

    def __call__(self, x, y=None, recompute=False):
        """Data -> noise. x (B, H, W, C); returns z (same shape, float32) and the
        total log-determinant per sample (B,). `recompute`: see FlowBlock.affine."""
        self.check_input(x, "x")
        self.check_text(y, x.shape[0])
        h, w = self.grid(x)
        tokens, logdet = self.through(self.patchify(x), y, h, w, recompute=recompute)
        return self.unpatchify(tokens, h, w), logdet

    def through(self, tokens, y, h: int, w: int, blocks=None, recompute=False):
        """Tokens (B, N, D) of an h x w grid through `blocks` (default: all, a run of
        self.blocks) in the density direction -> (tokens, log-determinant (B,)). y as
        __call__ takes it, or None where none of `blocks` is conditioned."""
        B = tokens.shape[0]
        tokens = tokens.astype(mx.float32)
        logdet = mx.zeros((B,), dtype=mx.float32)
        for block in self.blocks if blocks is None else blocks:
            if isinstance(block, IdentityBlock):
                continue
            tokens, ld = block(tokens, *self.block_args(block, y, B, h, w), recompute)
            logdet = logdet + ld
        return tokens, logdet

    def block_args(self, block, y, batch: int, h: int, w: int):
        """(rope, text, class rows) a block takes in the density direction, for y as
        __call__ takes it."""
        text = y if self.config.txt_dim else None
        t = text if block.has_text else None
        rope = self.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
        return rope, t, block.class_rows(y if text is None else None, batch)

    forward = __call__

    def log_prob(self, x, y=None, recompute=False):
        """Exact log p(x | y) per sample, in nats, of the flow's input space."""
        z, logdet = self(x, y, recompute)
        return log_normal(z) + logdet

    def bits_per_dim(self, x, y=None):
        D = math.prod(x.shape[1:])
        return -self.log_prob(x, y) / (D * math.log(2))

    # -- denoising -------------------------------------------------------------------

    def denoise_steps(self, x, y=None, noise_std: Optional[float] = None, rows: Optional[int] = DENOISE_ROWS):
        """The score step x + noise_std^2 * d/dx log p(x | y) (y the conditional rows), layer
        by layer: yields (steps done, steps) after each block of the first pass and each
        layer's forward and backward pass, so a caller can stop between them; returns the
        denoised x.

        The blocks below the last are run forward once to keep their inputs (tokens,
        small); then from the last block down, each block's gradient (FlowBlock.vjp_steps:
        the last with the prior) passes the gradient to the block below. Only one layer's
        activations are held at a time, `rows` query positions at a time (layer_vjp): at 3B
        the whole graph's would be several times the weights."""
        s = self.config.noise_std if noise_std is None else noise_std
        self.check_input(x, "x")
        self.check_text(y, x.shape[0])
        h, w = self.grid(x)
        B = x.shape[0]
        blocks = [b for b in self.blocks if not isinstance(b, IdentityBlock)]
        total = len(blocks) - 1 + 2 * sum(len(b.attn_blocks) for b in blocks)
        done = 0
        t = self.patchify(x.astype(mx.float32))
        inputs = []
        for block in blocks[:-1]:
            inputs.append(t)
            t = self.through(t, y, h, w, blocks=[block])[0]
            mx.eval(t)
            done += 1
            yield done, total
        inputs.append(t)
        del t
        g, ones = None, mx.ones((B,), dtype=mx.float32)
        while blocks:
            block, t_in = blocks.pop(), inputs.pop()
            cot = None if g is None else [g, ones]
            steps = block.vjp_steps(t_in, cot, *self.block_args(block, y, B, h, w), rows=rows)
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    g = stop.value
                    break
                done += 1
                yield done, total
            mx.eval(g)
        return x + (s * s) * self.unpatchify(g, h, w)

    def denoise(self, x, y=None, noise_std: Optional[float] = None, rows: Optional[int] = DENOISE_ROWS):
        """Score step: x + noise_std^2 * d/dx log p(x | y), y the conditional rows (denoise_steps
        run to the end)."""
        steps = self.denoise_steps(x, y, noise_std, rows)
        while True:
            try:
                next(steps)
            except StopIteration as stop:
                return stop.value

    def learned_denoise(self, x, y=None):
        """The learnable self-denoiser: x - 0.3 * denoiser(x, y)."""
        if "learnable_self_denoiser" not in self:
            raise ValueError("this model has no learnable self-denoiser; use the score step")
        self.check_input(x, "x")
        den = self.learnable_self_denoiser
        h, w = self.grid(x)
        text = self.check_text(y, x.shape[0]) if den.has_text else None
        rope = self.rope(den.has_text, h, w, 0 if text is None else text.shape[1])
        out = den(self.patchify(x), rope, text)
        return x - 0.3 * self.unpatchify(out, h, w)
