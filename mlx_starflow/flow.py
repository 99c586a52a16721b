"""The flow: STARFlow and TarFlow transformer autoregressive flows.

`forward` maps data to noise (density, exact log-likelihood); `sample` inverts it
token by token with a KV cache, or in Jacobi blocks. Arrays are channels-last:
images and latents are (B, H, W, C); tokens are (B, N, D) in natural order.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import FlowConfig
from .rope import apply_rope, rope_table

INV_SOFTPLUS_1 = 0.541324854612918  # softplus(0 + this) == 1: a zero output means unit scale


class Cancelled(Exception):
    """Raised inside sampling when a progress callback asks to stop."""


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


class Linear(nn.Linear):
    """nn.Linear whose weight may be held input-major, (in, out), as `weight_t`:
    a CPU BLAS streams that layout faster in the sampling step's 2-row products
    (see input_major)."""

    def __call__(self, x):
        if "weight_t" not in self:
            return super().__call__(x)
        return mx.addmm(self.bias, x, self.weight_t) if "bias" in self else x @ self.weight_t


def input_major(model: nn.Module) -> int:
    """Hold the float32 transformer linears' weights as (in, out), one layer at a
    time; returns how many changed. For sampling on the CPU: with MKL the deep
    block's 2-row products stream 20-23 GB/s of weights this way against 13 GB/s
    (BENCHMARKS.md). The weights' names change, so such a model is not to be
    saved or quantized; Metal keeps the usual layout."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, Linear) and "weight" in m and m.weight.dtype == mx.float32:
            m.weight_t = mx.contiguous(m.weight.T)
            m.pop("weight")
            mx.eval(m.weight_t)
            n += 1
    return n


def make_norm(cfg: FlowConfig, dims: int):
    return RMSNorm(dims) if cfg.norm_type == "rms_norm" else LayerNorm(dims)


class Attention(nn.Module):
    def __init__(self, cfg: FlowConfig, channels: int, heads: int, kv_heads: int, causal: bool):
        super().__init__()
        hd = cfg.head_dim
        self.norm = make_norm(cfg, channels)
        self.qkv = Linear(channels, (heads + 2 * kv_heads) * hd, bias=cfg.use_bias)
        self.proj = Linear(heads * hd, channels, bias=cfg.use_bias)
        if cfg.use_qk_norm:
            self.query_norm = RMSNorm(hd)
            self.key_norm = RMSNorm(hd)
        if cfg.use_post_norm:
            self.post_norm = RMSNorm(channels)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hd
        self.causal = causal
        self.scale = hd**-0.5

    def __call__(self, x, rope=None, cache: Optional[KVCache] = None):
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
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)
        # "causal" aligns the queries with the last keys, as a cached chunk needs.
        mask = "causal" if self.causal and T > 1 else None
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = self.proj(o.transpose(0, 2, 1, 3).reshape(B, T, h * hd))
        return self.post_norm(o) if "post_norm" in self else o


class MLP(nn.Module):
    def __init__(self, cfg: FlowConfig, channels: int):
        super().__init__()
        hidden = int(channels * cfg.expansion)
        self.norm = make_norm(cfg, channels)
        self.swiglu = cfg.use_swiglu
        if cfg.use_swiglu:
            self.gate_proj = Linear(channels, hidden, bias=cfg.use_bias)
            self.up_proj = Linear(channels, hidden, bias=cfg.use_bias)
            self.down_proj = Linear(hidden, channels, bias=cfg.use_bias)
        else:
            self.main = [Linear(channels, hidden, bias=cfg.use_bias), nn.GELU(),
                         Linear(hidden, channels, bias=cfg.use_bias)]
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
    def __init__(self, cfg, channels, heads, kv_heads, causal=True):
        super().__init__()
        self.attention = Attention(cfg, channels, heads, kv_heads, causal)
        self.mlp = MLP(cfg, channels)

    def __call__(self, x, rope=None, cache=None, mlp=None):
        x = x + self.attention(x, rope, cache)
        return x + self.mlp(x) if mlp is None else mlp(x)


def _rows(rope, start, end):
    return None if rope is None else (rope[0][start:end], rope[1][start:end])


@dataclass
class Jacobi:
    """Block-wise Jacobi sampling: chunks of `block_size` tokens, each iterated to
    a relative change below `threshold` or `max_iter` times."""

    block_size: int = 16
    threshold: float = 1e-3
    max_iter: int = 32

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"Jacobi block size must be at least 1, not {self.block_size}")
        if self.max_iter < 1:
            raise ValueError(f"Jacobi max_iter must be at least 1, not {self.max_iter}")


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

    def guided(self, a, b, w):
        """Scale and shift for the next tokens, combining the conditional and
        unconditional halves of the batch when guiding with weight w."""
        if w <= 0:
            return self.scale(a), b
        n = a.shape[0] // 2
        if self.linear_guidance:  # TarFlow guides a and b linearly
            a = a[:n] + w * (a[:n] - a[n:])
            b = b[:n] + w * (b[:n] - b[n:])
            s, mu = mx.exp(a), b
        else:
            s_all = self.scale(a)
            sc, su, bc, bu = s_all[:n], s_all[n:], b[:n], b[n:]
            r = mx.square(mx.minimum(sc / su, 1.0))
            denom = 1 + w - w * r
            s = sc / mx.sqrt(denom)
            mu = ((1 + w) * bc - (w * r) * bu) / denom
        return mx.concatenate([s, s]), mx.concatenate([mu, mu])

    # -- density -----------------------------------------------------------------

    def affine(self, x, rope=None, text=None, cond=None, recompute=False):
        """(a, b) for every token of x (B, N, D), already in this block's order,
        from one causal pass over the whole sequence: token t's from tokens < t.
        With `recompute`, a gradient through it keeps only each layer's input and
        recomputes the layer's activations (mx.checkpoint)."""
        inp = x
        if self.sos:
            sos = mx.broadcast_to(self.sos_embed, (x.shape[0], 1, x.shape[2])).astype(x.dtype)
            inp = mx.concatenate([sos, x[:, :-1]], axis=1)
        h = self.embed(inp, 0, cond)
        n_txt = 0
        if text is not None:
            t = self.text_prefix(text)
            n_txt = t.shape[1]
            h = mx.concatenate([t, h], axis=1)
        for layer in self.attn_blocks:
            h = mx.checkpoint(layer)(h, rope) if recompute else layer(h, rope)
        a, b = self.head(h[:, n_txt:])
        if not self.sos:  # output t predicts token t+1; token 0 passes unchanged
            a = mx.pad(a[:, :-1], [(0, 0), (1, 0), (0, 0)])
            b = mx.pad(b[:, :-1], [(0, 0), (1, 0), (0, 0)])
        return a, b

    def __call__(self, x, rope=None, text=None, cond=None, recompute=False):
        """Data -> noise for tokens x (B, N, D): returns z and the per-sample log-det."""
        if self.flip:
            x = x[:, ::-1]
        a, b = self.affine(x, rope, text, cond, recompute)
        z = (x.astype(mx.float32) - b) / self.scale(a)
        logdet = -self.log_scale(a).sum(axis=(1, 2))
        return (z[:, ::-1] if self.flip else z), logdet

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

    def sample(self, z, rope=None, text=None, cond=None, guidance=0.0,
               jacobi: Optional[Jacobi] = None, progress: Optional[Callable] = None):
        """Noise -> data for z (B', N, D) float32, B' already doubled when guiding.

        progress(done, total) is called after each token (or Jacobi chunk); it
        may raise Cancelled."""
        if self.flip:
            z = z[:, ::-1]
        B, N, D = z.shape
        n_txt = text.shape[1] if text is not None else 0
        caches = self.new_caches(B, n_txt + N)
        if text is not None:
            self.prefill(text, rope, caches)
        if jacobi is None:
            x = self._sample_sequential(z, caches, rope, cond, guidance, progress)
        else:
            x = self._sample_jacobi(z, caches, rope, cond, guidance, jacobi, progress)
        return x[:, ::-1] if self.flip else x

    def new_caches(self, batch, length):
        """One preallocated KV cache per layer for `length` positions."""
        dtype = self.proj_in.weight.dtype
        return [KVCache(batch, self.kv_heads, length, self.head_dim, dtype) for _ in self.attn_blocks]

    def prefill(self, text, rope, caches):
        """Feed the text prefix once; only its keys and values are kept."""
        h = self.text_prefix(text)
        r = _rows(rope, 0, text.shape[1])
        for layer, cache in zip(self.attn_blocks, caches):
            h = layer(h, r, cache)
        mx.eval([c.state for c in caches])

    def _sos(self, B):
        return mx.broadcast_to(self.sos_embed, (B, 1, self.sos_embed.shape[-1]))

    # Token loop options, measured by `python -m mlx_starflow.benchmark --compare-loop`
    # (BENCHMARKS.md). compile_step fuses the fixed-shape parts of a step (the MLPs, the
    # head and the guided update): faster on the CPU, and traced once per block, so
    # only for blocks long enough to repay the trace. overlap builds token t+1's graph
    # while token t computes: slower on a 2-core CPU, where both compete for the cores.
    overlap = False
    compile_step = True
    compile_min_tokens = 64

    def _compiled(self, guidance):
        # Built per call: the weights are baked in, so a later load or quantize is seen.
        mlps = [mx.compile(lambda x, m=layer.mlp: x + m(x)) for layer in self.attn_blocks]

        def finish(h, zt):
            s, mu = self.guided(*self.head(h), guidance)
            return zt * s + mu

        return mlps, mx.compile(finish)

    def _sample_sequential(self, z, caches, rope, cond, guidance, progress):
        B, N, _ = z.shape
        if self.sos:
            prev, tokens, first = self._sos(B), [], 0
        else:  # token 0 is its own noise; input t produces token t+1
            prev, tokens, first = z[:, :1], [z[:, :1]], 1
        compiled = self.compile_step and N >= self.compile_min_tokens
        mlps, finish = self._compiled(guidance) if compiled else (None, None)
        for t in range(N - first):
            i = t + first
            if mlps is None:
                s, mu = self.guided(*self.step(prev, t, caches, rope, cond), guidance)
                prev = z[:, i : i + 1] * s + mu
            else:
                prev = finish(self.step(prev, t, caches, rope, cond, mlps), z[:, i : i + 1])
            tokens.append(prev)
            if self.overlap:  # queue this token, then wait for the previous one: one sync per token
                mx.async_eval(prev)
                if len(tokens) > 1:
                    mx.eval(tokens[-2])
                done = i
            else:
                mx.eval(prev)  # one sync per token
                done = i + 1
            if progress is not None and done > 0:
                progress(done, N)
        if self.overlap:
            mx.eval(prev)
            if progress is not None:
                progress(N, N)
        return mx.concatenate(tokens, axis=1)

    def _sample_jacobi(self, z, caches, rope, cond, guidance, jac: Jacobi, progress):
        if not self.sos or "pos_embed" in self:
            raise ValueError("Jacobi sampling needs a model with an SOS token and RoPE; use sequential sampling")
        B, N, _ = z.shape
        # x_full[:, t] is the input at position t: SOS, then the current guesses (initially the noise).
        x_full = mx.concatenate([self._sos(B).astype(mx.float32), z], axis=1)
        start = 0
        while start < N:
            size = jac.block_size
            for i in range(jac.max_iter):
                if start + size >= N:
                    size = N - start
                a, b = self.step(x_full[:, start : start + size], start, caches, rope, cond)
                s, mu = self.guided(a, b, guidance)
                new = mu + s * z[:, start : start + size]
                old = x_full[:, start + 1 : start + 1 + size]
                diff = mx.mean(mx.square(new - old)) / mx.mean(mx.square(new))
                x_full[:, start + 1 : start + 1 + size] = new
                mx.eval(x_full, diff)  # one sync per iteration
                if diff.item() < jac.threshold or i == jac.max_iter - 1:
                    break  # keep this iteration's cache entries
                for cache in caches:
                    cache.rewind(size)
            start += size
            if progress is not None:
                progress(start, N)
        return x_full[:, 1:]


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
        self.attn_blocks = [Layer(cfg, cfg.channels, cfg.num_heads, cfg.num_kv_heads, causal=False)
                            for _ in range(cfg.denoiser_layers)]
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


class Flow(nn.Module):
    """A STARFlow or TarFlow model."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.blocks = [FlowBlock(cfg, i) if n > 0 else IdentityBlock() for i, n in enumerate(cfg.layers_per_block)]
        if cfg.learnable_self_denoiser:
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

    def _check_input(self, x, name):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"{name} must be (batch, height, width, {cfg.in_channels}), got shape {tuple(x.shape)}")
        h, w = self.grid(x)
        if not cfg.rope and h * w != cfg.num_tokens:
            raise ValueError(f"{name} must be {cfg.input_size}x{cfg.input_size} for this model "
                             f"(learned positions), got {x.shape[1]}x{x.shape[2]}")

    def _text(self, y, batch):
        cfg = self.config
        if cfg.txt_dim == 0:
            return None
        if y is None or y.ndim != 3 or y.shape[-1] != cfg.txt_dim:
            raise ValueError(f"text embeddings must be (batch, tokens, {cfg.txt_dim}), "
                             f"got {None if y is None else tuple(y.shape)}")
        if y.shape[0] != batch:
            raise ValueError(f"{y.shape[0]} rows of text embeddings for a batch of {batch}")
        return y

    # -- density -------------------------------------------------------------------

    def __call__(self, x, y=None, recompute=False):
        """Data -> noise. x (B, H, W, C); returns z (same shape, float32) and the
        total log-determinant per sample (B,). `recompute`: see FlowBlock.affine."""
        self._check_input(x, "x")
        B = x.shape[0]
        h, w = self.grid(x)
        text = self._text(y, B)
        tokens = self.patchify(x).astype(mx.float32)
        logdet = mx.zeros((B,), dtype=mx.float32)
        for block in self.blocks:
            if isinstance(block, IdentityBlock):
                continue
            t = text if block.has_text else None
            rope = self.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
            tokens, ld = block(tokens, rope, t, block.class_rows(y if text is None else None, B), recompute)
            logdet = logdet + ld
        return self.unpatchify(tokens, h, w), logdet

    forward = __call__

    def log_prob(self, x, y=None, recompute=False):
        """Exact log p(x | y) per sample, in nats, of the flow's input space."""
        z, logdet = self(x, y, recompute)
        D = math.prod(z.shape[1:])
        return -0.5 * mx.sum(mx.square(z), axis=(1, 2, 3)) - 0.5 * D * math.log(2 * math.pi) + logdet

    def bits_per_dim(self, x, y=None):
        D = math.prod(x.shape[1:])
        return -self.log_prob(x, y) / (D * math.log(2))

    # -- sampling -------------------------------------------------------------------

    def sample(self, noise, y=None, guidance: float = 0.0, jacobi: Optional[Jacobi] = None,
               progress: Optional[Callable] = None):
        """Noise -> data. noise (B, H, W, C). For STARFlow, y is the text embeddings:
        B rows, or 2B rows [conditional; unconditional] when guidance > 0. For
        TarFlow, y is the class labels (B,) and the unconditional pass uses the
        mean class embedding.

        progress(block_index, done, total) after each token or Jacobi chunk; it
        may raise Cancelled."""
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, not {guidance}")
        self._check_input(noise, "noise")
        cfg = self.config
        B = noise.shape[0]
        h, w = self.grid(noise)
        if cfg.txt_dim:
            text = self._text(y, 2 * B if guidance > 0 else y.shape[0] if y is not None else B)
            if guidance == 0 and text.shape[0] == 2 * B:
                text = text[:B]
            elif guidance == 0 and text.shape[0] != B:
                raise ValueError(f"{text.shape[0]} rows of text embeddings for a batch of {B}")
        else:
            text = None
        tokens = self.patchify(noise).astype(mx.float32)
        order = [len(self.blocks) - 1] + list(range(len(self.blocks) - 2, -1, -1))
        for i in order:
            block = self.blocks[i]
            if isinstance(block, IdentityBlock):
                continue
            conditioned = block.has_text or "class_embed" in block
            g = guidance if conditioned else 0.0
            t = None
            if block.has_text:
                t = text if g > 0 else text[:B]
            rope = self.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
            cond = None
            if "class_embed" in block:
                cond = block.class_rows(y, B, sampling=True)
                if g > 0:
                    cond = mx.concatenate([cond, block.class_rows(None, B, unconditional=True)])
            z = mx.concatenate([tokens, tokens]) if g > 0 else tokens
            cb = None if progress is None else (lambda done, total, i=i: progress(i, done, total))
            tokens = block.sample(z, rope, t, cond, g, jacobi, cb)[:B]
        return self.unpatchify(tokens, h, w)

    # -- denoising -------------------------------------------------------------------

    def denoise(self, x, y=None, noise_std: Optional[float] = None):
        """Score step: x + noise_std^2 * d/dx log p(x | y), y the conditional rows.

        The gradient recomputes each layer's activations instead of keeping them
        all: at 3B they would be several times the memory of the weights."""
        s = self.config.noise_std if noise_std is None else noise_std
        grad = mx.grad(lambda v: self.log_prob(v, y, recompute=True).sum())(x.astype(mx.float32))
        return x + (s * s) * grad

    def learned_denoise(self, x, y=None):
        """The learnable self-denoiser: x - 0.3 * denoiser(x, y)."""
        if "learnable_self_denoiser" not in self:
            raise ValueError("this model has no learnable self-denoiser; use the score step")
        self._check_input(x, "x")
        den = self.learnable_self_denoiser
        h, w = self.grid(x)
        text = self._text(y, x.shape[0]) if den.has_text else None
        rope = self.rope(den.has_text, h, w, 0 if text is None else text.shape[1])
        out = den(self.patchify(x), rope, text)
        return x - 0.3 * self.unpatchify(out, h, w)
