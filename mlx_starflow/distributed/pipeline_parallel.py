"""Pipeline parallel: the deep block split by layers over the ranks of a group.

The deep block's layers are split into contiguous ranges, one per rank, and each rank
reads only its own layers' weights (the safetensors file is loaded lazily). Rank 0 also
holds the shallow blocks, the text encoder, the learned denoiser and the VAE, so it takes
fewer deep layers (`placement` balances the weights). Per token (or Jacobi chunk) the
hidden state goes from rank to rank with send/recv; every rank runs the same sampler loop
on the last rank's output, which all_gather shares. KV caches stay with their layers. The
score denoising step takes the deep block's density over the whole sequence rank to rank
and its gradient back (PipelineFlow.denoise with follow_denoise).
"""

import time
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..loading.quant import quant_args, quantize_linear
from ..loading.weights import load_flow
from ..models.config import FlowConfig
from ..models.flow import Flow, FlowBlock, _rows
from .group import GO, STOP, GroupError, Stopped, _exchange, _stall, shares

# -- pipeline parallel: the deep block split by layers ----------------------------------------------


class PipelineBlock(FlowBlock):
    """The deep block on one rank of a pipeline: `attn_blocks` holds only this rank's
    layers (`layers`, a range of the block's layer indices) and their KV caches.

    Rank 0 embeds the inputs; each rank runs its layers and sends the hidden state to
    the next; the last rank's output is shared with all ranks, which apply the head
    and run the same sampler loop. A control word (go or stop, rows, tokens) precedes
    each hidden state, so rank 0 can stop the others cleanly (`abort`)."""

    def __init__(self, cfg: FlowConfig, index: int, group, layers: range, text: bool = True):
        """The deep block (index) of cfg with only `layers` of its layers; without `text`,
        no text projection (ranks > 0 never embed the prompt)."""
        super().__init__(cfg, index)
        self.attn_blocks = self.attn_blocks[layers.start : layers.stop]
        if not text and "proj_txt" in self:
            del self.proj_txt
        self.group, self.layers = group, layers

    @property
    def width(self) -> int:
        return self.proj_in.weight.shape[0]

    def _hidden(self, first, shape, run, watch=True):
        """run(h), this rank's layers, over the hidden state of `shape`: rank 0 computes
        it with first(), the others receive it after a control word. Returns (this
        rank's input, its output, sends still to evaluate). `watch`: the wait for the
        control word counts against the step timeout."""
        g = self.group
        rank, size = g.rank(), g.size()
        dtype = self.proj_in.weight.dtype
        pending = []
        if watch:
            _stall.beat(g)
        else:
            _stall.stop()
        if rank == 0:
            pending.append(mx.distributed.send(mx.array([GO, shape[0], shape[1]], dtype=mx.int32), 1, group=g))
            h = first()
        else:
            ctrl = mx.distributed.recv((3,), mx.int32, rank - 1, group=g)
            flag, rows, n = _exchange(g, ctrl).tolist()
            if watch:
                _stall.beat(g)
            if rank < size - 1:
                pending.append(mx.distributed.send(ctrl, rank + 1, group=g))
            if flag == STOP:
                _exchange(g, pending)
                raise Stopped("rank 0 stopped")
            if (rows, n) != tuple(shape[:2]):
                raise GroupError(
                    f"rank {rank} expected a hidden state of {shape[0]} rows x {shape[1]} tokens, "
                    f"rank {rank - 1} sends {rows} x {n}: the ranks are not sampling the same thing"
                )
            h = mx.distributed.recv(shape, dtype, rank - 1, group=g)
        h_in, h = h, run(h)
        if h.dtype != dtype:
            raise TypeError(
                f"the hidden state changed type ({dtype} -> {h.dtype}) in layers {self.layers}: "
                "load the model with one dtype"
            )
        if rank < size - 1:  # after the control word
            h = mx.distributed.send(mx.depends(h, pending) if pending else h, rank + 1, group=g)
            pending = [h]
        return h_in, h, pending

    def _share(self, h, pending, rows):
        """The last rank's h (its first `rows` rows) on every rank."""
        g, size = self.group, self.group.size()
        mine = h if g.rank() == size - 1 else mx.depends(mx.zeros(h.shape, dtype=h.dtype), pending)
        return mx.distributed.all_gather(mine, group=g)[(size - 1) * rows : size * rows]

    def step(self, inputs, start, caches, rope, cond, mlps=None):
        B, n = inputs.shape[:2]
        pos = caches[0].offset if caches else start
        r = _rows(rope, pos, pos + n)

        def run(h):
            for i, (layer, cache) in enumerate(zip(self.attn_blocks, caches)):
                h = layer(h, r, cache, None if mlps is None else mlps[i])
            return h

        _, h, pending = self._hidden(lambda: self.embed(inputs, start, cond), (B, n, self.width), run)
        h = self._share(h, pending, B)
        return h if mlps is not None else self.head(h)

    def prefill(self, text, rope, caches):
        r = _rows(rope, 0, text.shape[1])

        def run(h):
            for layer, cache in zip(self.attn_blocks, caches):
                h = layer(h, r, cache)
            return h

        shape = (text.shape[0], text.shape[1], self.width)
        _, _, pending = self._hidden(lambda: self.text_prefix(text), shape, run)
        _exchange(self.group, [c.state for c in caches] + pending)

    # -- the score denoising step: the density over the whole sequence, its gradient back ----

    def _outputs(self, h, n_txt):
        """(a, b) of the tokens from the last hidden state, as FlowBlock.affine ends."""
        a, b = self.head(h[:, n_txt:])
        if not self.sos:  # output t predicts token t+1; token 0 passes unchanged
            a = mx.pad(a[:, :-1], [(0, 0), (1, 0), (0, 0)])
            b = mx.pad(b[:, :-1], [(0, 0), (1, 0), (0, 0)])
        return a, b

    def _checkpointed(self, rope):
        def run(h):  # each layer's activations recomputed in the backward pass, as Flow.denoise does
            for layer in self.attn_blocks:
                h = mx.checkpoint(layer)(h, rope)
            return h

        return run

    def density_forward(self, first, rows, tokens, rope, n_txt):
        """Every rank: the block over a whole sequence (text prefix and tokens) rank to
        rank, rank 0 computing the first hidden state with first(). Returns (this
        rank's input, every token's (a, b) packed (rows, tokens, 2 D), on every rank).
        Waits are not timed: rank 0 may first sample the shallow blocks for long."""
        g = self.group
        last = g.rank() == g.size() - 1
        shape = (rows, n_txt + tokens, self.width)
        h_in, h, pending = self._hidden(first, shape, self._checkpointed(rope), watch=False)
        dim = self.proj_in.weight.shape[1]
        ab = mx.concatenate(self._outputs(h, n_txt), axis=-1) if last else mx.zeros((rows, tokens, 2 * dim))
        return h_in, _exchange(g, self._share(ab, pending, rows))

    def density_backward(self, h_in, g_ab, rope, n_txt):
        """Every rank, after density_forward: rank 0's cotangent of (a, b) (the others
        pass zeros of its shape) goes to the last rank, and the gradient comes back
        rank to rank through the layers. Returns, on rank 0, the cotangent of its own
        layers' output; None elsewhere."""
        g = self.group
        rank, size = g.rank(), g.size()
        run = self._checkpointed(rope)
        g_ab = _exchange(g, mx.distributed.all_gather(g_ab, group=g)[: h_in.shape[0]])
        if rank == size - 1:
            fn, cot = (lambda h: mx.concatenate(self._outputs(run(h), n_txt), axis=-1)), g_ab
        else:
            fn, cot = run, mx.distributed.recv(h_in.shape, h_in.dtype, rank + 1, group=g)
        if rank == 0:
            return _exchange(g, cot)
        _, (grad,) = mx.vjp(fn, [h_in], [cot])
        _exchange(g, mx.distributed.send(grad, rank - 1, group=g))
        return None

    def abort(self):
        """On rank 0, between steps: tell the other ranks, waiting for the next hidden
        state, that sampling stopped (they raise Stopped)."""
        if self.group.rank() == 0:
            _stall.beat(self.group)
            _exchange(self.group, mx.distributed.send(mx.array([STOP, 0, 0], dtype=mx.int32), 1, group=self.group))

    def affine(self, *args, **kwargs):
        raise ValueError(
            "the density of a pipeline-parallel deep block (likelihood, inversion) is not "
            "available: only sampling and the score denoising step are split across ranks"
        )


class PipelineFlow(Flow):
    """Rank 0's flow in a pipeline: the score denoising step takes the deep block's
    gradient across the ranks (the others take part with follow_denoise)."""

    def denoise_steps(self, x, y=None, noise_std=None):
        """The step in one go (its exchanges cross the ranks as one): one report, then the result."""
        yield 0, 1
        return self.denoise(x, y, noise_std)

    def denoise(self, x, y=None, noise_std=None):
        """x + noise_std^2 * d/dx log p(x | y), as Flow.denoise: the shallow blocks here,
        the deep block's density over the ranks, its gradient passed back."""
        s = self.config.noise_std if noise_std is None else noise_std
        deep = self.blocks[-1]
        self.check_input(x, "x")
        B = x.shape[0]
        h, w = self.grid(x)
        text = self.check_text(y, B)
        t = text if deep.has_text else None
        n_txt = 0 if t is None else t.shape[1]
        rope = self.rope(deep.has_text, h, w, n_txt)
        cond = deep.class_rows(y if text is None else None, B)

        def tokens_of(v):  # the shallow blocks alone
            return self.through(self.patchify(v), y, h, w, blocks=self.blocks[:-1], recompute=True)

        def first_hidden(tokens):  # FlowBlock.affine's start: sos, shifted tokens, text prefix
            seq = tokens[:, ::-1] if deep.flip else tokens
            if deep.sos:
                seq = mx.concatenate([deep.sos_tokens(B).astype(seq.dtype), seq[:, :-1]], axis=1)
            hidden = deep.embed(seq, 0, cond)
            return hidden if t is None else mx.concatenate([deep.text_prefix(t), hidden], axis=1)

        def log_p(tokens, ab):  # the deep block's share of log p, given its (a, b)
            a, b = mx.split(ab, 2, axis=-1)
            z = ((tokens[:, ::-1] if deep.flip else tokens) - b) / deep.scale(a)
            return -0.5 * mx.sum(z * z) - mx.sum(deep.log_scale(a))

        v = x.astype(mx.float32)
        tokens = tokens_of(v)[0]
        mx.eval(tokens)
        h0, ab = deep.density_forward(lambda: first_hidden(tokens), B, tokens.shape[1], rope, n_txt)
        g_tokens, g_ab = mx.grad(log_p, argnums=(0, 1))(tokens, ab)
        cot = deep.density_backward(h0, g_ab, rope, n_txt)
        run = deep._checkpointed(rope)
        _, (g_via,) = mx.vjp(lambda tok: run(first_hidden(tok)), [tokens], [cot])
        _, (grad,) = mx.vjp(lambda u: list(tokens_of(u)), [v], [g_tokens + g_via, mx.ones((B,))])
        return x + (s * s) * grad


def follow_denoise(flow: Flow, rows: int, grid):
    """Ranks > 0 of a pipeline: take part in rank 0's score denoising step for a
    batch of `rows` images of a (height, width) token grid."""
    deep = flow.blocks[-1]
    n_txt = flow.config.txt_size if deep.has_text else 0
    rope = flow.rope(deep.has_text, grid[0], grid[1], n_txt)
    h_in, ab = deep.density_forward(None, rows, grid[0] * grid[1], rope, n_txt)
    deep.density_backward(h_in, mx.zeros_like(ab), rope, n_txt)


def hop_seconds(group, cfg, rows: int = 2, tokens: int = 1, dtype=mx.float32, repeats: int = 100) -> float:
    """Median seconds of the exchanges of one pipeline step (every rank calls it): a
    step of cfg's deep block with no layers on any rank, so what is timed is the
    control words, the hidden state going rank to rank and the last rank's output
    shared with all, at the block's width (and the tiny input and output projections)."""
    block = PipelineBlock(cfg, cfg.num_blocks - 1, group, range(0))  # no layers: parameters are lazy
    block.set_dtype(dtype)
    mx.eval(block.parameters())
    x = mx.zeros((rows, tokens, cfg.token_dim))
    times = []
    for _ in range(repeats + 5):
        t0 = time.perf_counter()
        _exchange(group, block.step(x, 0, [], None, None))
        times.append(time.perf_counter() - t0)
    _stall.stop()
    return float(np.median(times[5:]))


def pipeline_block(flow: Flow) -> Optional[PipelineBlock]:
    block = flow.blocks[-1]
    return block if isinstance(block, PipelineBlock) else None


def placement(flow: Flow, size: int) -> List[range]:
    """The deep block's layers in contiguous ranges, one per rank, balancing the
    parameters each rank holds: rank 0 also holds the shallow blocks, the denoiser and
    the text projection, so it takes fewer deep layers (at least one). Only shapes
    are read."""
    deep = flow.blocks[-1]
    n = len(deep.attn_blocks)
    if n < size:
        raise ValueError(f"the deep block has {n} layers: pipeline parallel takes at most {n} ranks, not {size}")
    if size == 1:
        return [range(n)]

    def count(module):
        return sum(v.size for _, v in tree_flatten(module.parameters()))

    layer = count(deep.attn_blocks[0])
    shared = count(deep) - n * layer - (count(deep.proj_txt) if "proj_txt" in deep else 0)  # on every rank
    extra = (count(flow) - n * layer - shared) / layer  # what rank 0 holds alone, in deep layers
    first = min(range(1, n - size + 2), key=lambda k: max(k + extra, -(-(n - k) // (size - 1))))
    return [range(0, first)] + [range(first + r.start, first + r.stop) for r in shares(n - first, size - 1)]


def _part(cfg, rank: int, size: int, group=None):
    """The flow of config cfg as rank `rank` of a pipeline of `size` holds it: the
    deep block with only this rank's contiguous range of layers, and on ranks > 0
    neither the shallow blocks, the denoiser nor the text projection (rank 0's flow is
    a PipelineFlow). Returns (flow, the range of layers). Parameters are lazy: nothing
    dropped is ever computed."""
    if cfg.pretrained_lm is not None:  # its deep block is a language model's, not a FlowBlock
        raise ValueError(
            f"pipeline parallel does not split a {cfg.pretrained_lm} deep block yet: run this model batch "
            "parallel (without --pipeline-parallel)"
        )
    top = cfg.num_blocks - 1
    layers = placement(Flow(cfg), size)[rank]
    deep = PipelineBlock(cfg, top, group, layers, text=rank == 0)
    if rank == 0:
        return PipelineFlow(cfg, deep=deep), layers
    return Flow(cfg, deep=deep, shallow=False), layers


def rank_bytes(cfg, size: int, dtype=mx.bfloat16, quantize=None, batch: int = 1, guided: bool = True) -> List[dict]:
    """Per rank of a pipeline of `size`: the bytes of the flow parameters it holds
    ("weights", in dtype, the transformer linears quantized as the loader does) and of
    its KV caches for the deep block ("kv_cache", a batch of images, doubled when
    guided). Computed from the shapes: nothing is allocated."""

    q = quant_args(quantize)
    out = []
    for rank in range(size):
        flow, layers = _part(cfg, rank, size)
        flow.set_dtype(dtype)
        if q:
            quantize_linear(flow, q["bits"], q["group_size"])
        weights = sum(v.nbytes for _, v in tree_flatten(flow.parameters()))
        deep = flow.blocks[-1]
        per_layer = (
            2
            * (2 if guided else 1)
            * batch
            * deep.kv_heads
            * (cfg.txt_size + cfg.num_tokens)
            * deep.head_dim
            * mx.zeros((), dtype=dtype).itemsize
        )
        out.append({"rank": rank, "layers": layers, "weights": weights, "kv_cache": per_layer * len(layers)})
    return out


def load_part(path, group, dtype=None, quantize=None) -> Flow:
    """A converted folder's flow with only this rank's share of the deep block's
    layers (rank 0 also keeps the shallow blocks and the denoiser), through
    weights.load_flow: only the kept tensors are ever read."""

    def part(cfg):
        flow, layers = _part(cfg, group.rank(), group.size(), group)
        top = len(flow.blocks) - 1
        elsewhere = ()  # names of what rank 0 holds alone
        if group.rank() > 0:
            elsewhere = (*(f"blocks.{i}." for i in range(top)), "learnable_self_denoiser.", f"blocks.{top}.proj_txt.")
        prefix = f"blocks.{top}.attn_blocks."

        def rename(k):
            i, _, rest = k[len(prefix) :].partition(".")
            if k.startswith(prefix) and i.isdigit():
                return f"{prefix}{int(i) - layers.start}.{rest}" if int(i) in layers else None
            return None if k.startswith(elsewhere) else k

        return flow, rename

    return load_flow(path, dtype=dtype, quantize=quantize, part=part)
