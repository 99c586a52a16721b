"""Sampling a flow: noise -> data, and its exact inverse under guidance.

Blocks are sampled deep (top) block first, then the shallow blocks from the
highest index down, each token by token with a KV cache or in Jacobi chunks.
`sample_steps` is a generator that yields a `Step` after every token (or Jacobi
iteration): a caller shows progress, times tokens, previews, or cancels by simply
no longer iterating, so nothing runs more than one iteration past its cancel.
`sample` runs it to the end. `invert` is the guided density direction: for any
guidance weight, sample(invert(x)) == x.
"""

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Optional, Tuple

import mlx.core as mx

from .models.flow import Flow, FlowBlock, IdentityBlock


class OptionError(ValueError):
    """A sampling or generation option out of range; `option` names it, so a command
    line can name the flag the user typed."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def is_whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Jacobi:
    """Block-wise Jacobi sampling: chunks of `block_size` tokens, each iterated to
    a relative change below `threshold` or `max_iter` times."""

    block_size: int = 16
    threshold: float = 1e-3
    max_iter: int = 32

    def __post_init__(self):
        if not is_whole(self.block_size) or self.block_size < 1:
            raise OptionError(
                "jacobi_block_size",
                f"the Jacobi block size must be at least 1 (a whole number), not {self.block_size!r}",
            )
        if not is_whole(self.max_iter) or self.max_iter < 1:
            raise OptionError(
                "jacobi_max_iter", f"the Jacobi max_iter must be at least 1 (a whole number), not {self.max_iter!r}"
            )
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise OptionError(
                "jacobi_threshold", f"the Jacobi threshold must be >= 0 and finite, not {self.threshold!r}"
            )

    def change(self, new, old):
        """The stopping measure of one iteration: the change relative to the new values,
        over the whole batch (as the reference measures it; a distributed group sums it
        over the group's batch, distributed.GroupJacobi)."""
        return mx.mean(mx.square(new - old)) / mx.mean(mx.square(new))


KV_BITS = (4, 8)


def check_kv_bits(kv_bits) -> Optional[int]:
    if kv_bits is not None and (not is_whole(kv_bits) or kv_bits not in KV_BITS):
        raise OptionError("kv_bits", f"kv_bits must be None (a float cache) or one of 4, 8, not {kv_bits!r}")
    return kv_bits


def check_guidance(guidance) -> float:
    """The guidance weight as a float, or a ValueError naming what is wrong."""
    try:
        w = float(guidance)
    except (TypeError, ValueError):
        w = math.nan
    if isinstance(guidance, bool) or not math.isfinite(w) or w < 0:
        raise OptionError("guidance", f"guidance must be >= 0 and finite, not {guidance!r}")
    return w


def guided(block: FlowBlock, a, b, w: float):
    """Scale and shift for the next tokens, combining the conditional and
    unconditional halves of the batch when guiding with weight w; x = z * s + mu.
    With w > 0 the result has the rows of the conditional half only."""
    if w <= 0:
        return block.scale(a), b
    n = a.shape[0] // 2
    if block.linear_guidance:  # TarFlow guides a and b linearly
        a = a[:n] + w * (a[:n] - a[n:])
        b = b[:n] + w * (b[:n] - b[n:])
        return mx.exp(a), b
    s_all = block.scale(a)
    sc, su, bc, bu = s_all[:n], s_all[n:], b[:n], b[n:]
    r = mx.square(mx.minimum(sc / su, 1.0))
    denom = 1 + w - w * r
    return sc / mx.sqrt(denom), ((1 + w) * bc - (w * r) * bu) / denom


def guided_doubled(block: FlowBlock, a, b, w: float):
    """guided(), its (scale, mean) repeated for both halves of the guidance batch: the
    sampled tokens feed both."""
    s, mu = guided(block, a, b, w)
    return (mx.concatenate([s, s]), mx.concatenate([mu, mu])) if w > 0 else (s, mu)


# -- one block ---------------------------------------------------------------------------


def _compiled(block: FlowBlock, guidance: float):
    """The fixed-shape parts of a sequential step fused by mx.compile: each layer's
    MLP residual, and the head with the guided update. Built per block sampled, so
    weights loaded or quantized later are seen."""
    mlps = [mx.compile(lambda x, m=layer.mlp: x + m(x)) for layer in block.attn_blocks]

    def finish(h, zt):
        s, mu = guided_doubled(block, *block.head(h), guidance)
        return zt * s + mu

    return mlps, mx.compile(finish)


def _sequential(block, z, caches, rope, cond, guidance, compile_step, overlap, compile_min_tokens):
    B, N, _ = z.shape
    if block.sos:
        prev, tokens, first = block.sos_tokens(B), [], 0
    else:  # token 0 is its own noise; input t produces token t+1
        prev, tokens, first = z[:, :1], [z[:, :1]], 1
    mlps, finish = _compiled(block, guidance) if compile_step and N >= compile_min_tokens else (None, None)

    def current(start=0, end=N):  # tokens[k] is token k; the rest still noise
        done = tokens[start:end]
        rest = z[:, start + len(done) : end]
        return mx.concatenate(done + [rest], axis=1) if done else rest

    for t in range(N - first):
        i = t + first
        if mlps is None:
            s, mu = guided_doubled(block, *block.step(prev, t, caches, rope, cond), guidance)
            prev = z[:, i : i + 1] * s + mu
        else:
            prev = finish(block.step(prev, t, caches, rope, cond, mlps), z[:, i : i + 1])
        tokens.append(prev)
        if overlap:  # queue this token, then wait for the previous one: still one sync per token
            mx.async_eval(prev)
            if len(tokens) > 1:
                mx.eval(tokens[-2])
            if i > 0:
                yield i, current
        else:
            mx.eval(prev)  # one sync per token
            yield i + 1, current
    if overlap:
        mx.eval(prev)
        yield N, current
    return mx.concatenate(tokens, axis=1)


def jacobi_input(block, z):
    """x_full for Jacobi: x_full[:, t] is the input at position t, SOS and then the current
    guesses of the tokens (at first their noise)."""
    return mx.concatenate([block.sos_tokens(z.shape[0]).astype(mx.float32), z], axis=1)


def jacobi_chunk(block, x_full, z, start, size, caches, rope, cond, guidance, jac: Jacobi, src=None):
    """Iterate tokens start..start+size of x_full to a fixed point (or jac.max_iter), one
    sync an iteration. src: where the first iteration reads its inputs when not at
    `start` (a streamed video's chunk begins from the frame before). A generator: yields
    after each iteration that did not converge, its cache entries rewound (a point to
    stop at); the last iteration's entries stay."""
    for i in range(jac.max_iter):
        at = src if i == 0 and src is not None else start
        a, b = block.step(x_full[:, at : at + size], start, caches, rope, cond)
        s, mu = guided_doubled(block, a, b, guidance)
        new = mu + s * z[:, start : start + size]
        diff = jac.change(new, x_full[:, start + 1 : start + 1 + size])
        x_full[:, start + 1 : start + 1 + size] = new
        mx.eval(x_full, diff)  # one sync per iteration
        if diff.item() < jac.threshold or i == jac.max_iter - 1:
            return
        for cache in caches:
            cache.rewind(size)
        yield


def _jacobi(block, z, caches, rope, cond, guidance, jac: Jacobi):
    if not block.sos or "pos_embed" in block:
        raise ValueError("Jacobi sampling needs a model with an SOS token and RoPE; use sequential sampling")
    N = z.shape[1]
    x_full = jacobi_input(block, z)

    def current(start=0, end=N):
        return x_full[:, 1 + start : 1 + end]

    start = 0
    while start < N:
        size = min(jac.block_size, N - start)
        for _ in jacobi_chunk(block, x_full, z, start, size, caches, rope, cond, guidance, jac):
            yield start, current  # within the chunk: no token finished yet
        start += size
        yield start, current
    return x_full[:, 1:]


def _block_loop(block, z, caches, rope, cond, guidance, jacobi, compile_step, overlap, compile_min_tokens):
    if jacobi is None:
        return _sequential(block, z, caches, rope, cond, guidance, compile_step, overlap, compile_min_tokens)
    return _jacobi(block, z, caches, rope, cond, guidance, jacobi)


def block_steps(
    block: FlowBlock,
    z,
    caches,
    rope=None,
    cond=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    compile_step: bool = True,
    overlap: bool = False,
    compile_min_tokens: int = 64,
):
    """Sample one block: z (B', N, D) float32 in the block's own order (B' doubled
    when guiding), caches already holding any prefix (their offset is where these
    tokens start). Yields the number of tokens done after each token or Jacobi chunk
    (one sync each); returns x (B', N, D).

    compile_step fuses the fixed-shape parts of a sequential step (faster, but traced
    once per block, so only for blocks of at least compile_min_tokens tokens); overlap
    builds token t+1's graph while token t computes (pays on a GPU, not on a 2-core
    CPU where both compete). Measured by `python -m mlx_starflow.benchmark --compare-loop`."""
    loop = block_points(
        block,
        z,
        caches,
        rope,
        cond,
        guidance,
        jacobi=jacobi,
        compile_step=compile_step,
        overlap=overlap,
        compile_min_tokens=compile_min_tokens,
    )
    while True:
        try:
            done, _ = next(loop)
        except StopIteration as stop:
            return stop.value
        yield done


def block_points(
    block: FlowBlock,
    z,
    caches,
    rope=None,
    cond=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    compile_step: bool = True,
    overlap: bool = False,
    compile_min_tokens: int = 64,
):
    """block_steps with the tokens: yields (done, current) after each finished token or
    Jacobi chunk, current(start=0, end=N) giving the block's tokens [start, end) (B', n, D)
    in its order, the first `done` of them final (video_sample hands a finished frame on while the block goes on)."""
    loop = _block_loop(block, z, caches, rope, cond, guidance, jacobi, compile_step, overlap, compile_min_tokens)
    last = 0
    while True:
        try:
            done, current = next(loop)
        except StopIteration as stop:
            return stop.value
        if done > last:  # Jacobi's points within a chunk finish no token
            last = done
            yield done, current


def _run_block(block, z, rope, text, cond, guidance, jacobi, compile_step, overlap, kv_bits=None):
    """Sample one block from its noise z (B', N, D) in natural token order: its own
    caches (quantized to kv_bits when given), the text prefix, the loop. Yields (done,
    current tokens in the block's order); returns x in natural order."""
    if block.flip:
        z = z[:, ::-1]
    n_txt = 0 if text is None else text.shape[1]
    caches = block.new_caches(z.shape[0], n_txt + z.shape[1], kv_bits)
    if text is not None:
        block.prefill(text, rope, caches)
    x = yield from _block_loop(block, z, caches, rope, cond, guidance, jacobi, compile_step, overlap, 64)
    return x[:, ::-1] if block.flip else x


def sample_block(
    block: FlowBlock,
    z,
    rope=None,
    text=None,
    cond=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    compile_step: bool = True,
    overlap: bool = False,
):
    """Noise -> data through one block: z (B', N, D) in natural order, B' doubled
    (text and cond rows too) when guiding; returns x (B', N, D)."""
    loop = _run_block(block, z, rope, text, cond, guidance, jacobi, compile_step, overlap)
    while True:
        try:
            next(loop)
        except StopIteration as stop:
            return stop.value


# -- the whole flow ------------------------------------------------------------------------


@dataclass
class Step:
    """Where sampling is: `done` of `total` tokens of block `block` are finished.
    `x` is set on the last step only: the finished sample (B, H, W, C)."""

    block: int
    done: int
    total: int
    x: Optional[mx.array] = None
    _view: Optional[Callable] = None

    def preview(self) -> mx.array:
        """(B, H, W, C): the block's finished tokens, the rest still noise (or the
        current Jacobi guesses), in image layout."""
        return self.x if self.x is not None else self._view()


def _conditioning(flow: Flow, block: FlowBlock, y, text, B: int, w: float):
    """The text rows and class rows block needs for a batch of B, doubled when guiding."""
    t = None
    if block.has_text:
        t = text if w > 0 else text[:B]
    cond = None
    if "class_embed" in block:
        cond = block.class_rows(y, B, sampling=True)
        if w > 0:
            cond = mx.concatenate([cond, block.class_rows(None, B, unconditional=True)])
    return t, cond


def _prepare(flow: Flow, x, y, guidance, name: str):
    """Checks shared by sampling and inversion; returns (B, h, w, text, guidance)."""
    w = check_guidance(guidance)
    flow.check_input(x, name)
    cfg = flow.config
    B = x.shape[0]
    h, wd = flow.grid(x)
    text = None
    if cfg.txt_dim:
        rows = 2 * B if w > 0 else y.shape[0] if y is not None else B
        text = flow.check_text(y, rows)
        if w == 0 and text.shape[0] == 2 * B:
            text = text[:B]
        elif w == 0 and text.shape[0] != B:
            raise ValueError(f"{text.shape[0]} rows of text embeddings for a batch of {B}")
    return B, h, wd, text, w


def sampling_order(flow: Flow):
    """Indices of the blocks with layers, in the order sampling visits them."""
    n = len(flow.blocks)
    return [i for i in [n - 1] + list(range(n - 2, -1, -1)) if not isinstance(flow.blocks[i], IdentityBlock)]


def sample_steps(
    flow: Flow,
    noise,
    y=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    compile_step: bool = True,
    overlap: bool = False,
    kv_bits: Optional[int] = None,
) -> Iterator[Step]:
    """Noise -> data, one Step per token or Jacobi iteration (those within a chunk repeat
    its start as `done`: a point to cancel at, with nothing finished). noise (B, H, W, C). For
    STARFlow, y is the text embeddings: B rows, or 2B rows [conditional;
    unconditional] when guidance > 0. For TarFlow, y is the class labels (B,), the
    unconditional pass using the mean class embedding. kv_bits (8 or 4): the deep block's
    KV cache quantized (models/cache.py), less memory for a small change of the sample.
    Stop iterating to cancel."""
    check_kv_bits(kv_bits)
    B, h, w, text, g_all = _prepare(flow, noise, y, guidance, "noise")
    tokens = flow.patchify(noise).astype(mx.float32)
    order = sampling_order(flow)
    for k, i in enumerate(order):
        block = flow.blocks[i]
        g = g_all if (block.has_text or "class_embed" in block) else 0.0
        t, cond = _conditioning(flow, block, y, text, B, g)
        rope = flow.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
        z = mx.concatenate([tokens, tokens]) if g > 0 else tokens
        deep = i == len(flow.blocks) - 1
        loop = _run_block(block, z, rope, t, cond, g, jacobi, compile_step, overlap, kv_bits if deep else None)

        def image(seq, block=block):
            seq = seq[:B]
            return flow.unpatchify(seq[:, ::-1] if block.flip else seq, h, w)

        while True:
            try:
                done, current = next(loop)
            except StopIteration as stop:
                x = stop.value[:B]
                break
            if done < z.shape[1]:
                yield Step(i, done, z.shape[1], None, lambda c=current, f=image: f(c()))
        tokens = x
        last = k == len(order) - 1
        out = flow.unpatchify(tokens, h, w)
        yield Step(i, z.shape[1], z.shape[1], out if last else None, lambda o=out: o)


def sample(
    flow: Flow,
    noise,
    y=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    compile_step: bool = True,
    overlap: bool = False,
    kv_bits: Optional[int] = None,
) -> mx.array:
    """Run sample_steps to the end: the sample (B, H, W, C)."""
    steps = sample_steps(
        flow, noise, y, guidance, jacobi=jacobi, compile_step=compile_step, overlap=overlap, kv_bits=kv_bits
    )
    return deque(steps, maxlen=1)[0].x  # the last step, holding no others


def invert_steps(flow: Flow, x, y=None, guidance: float = 0.0) -> Generator[Tuple[int, int], None, mx.array]:
    """`invert` as a generator: yields (blocks done, blocks) after each block, so a caller
    can report progress or stop between blocks; its return value is the noise."""
    B, h, w, text, g_all = _prepare(flow, x, y, guidance, "x")
    tokens = flow.patchify(x).astype(mx.float32)
    order = list(reversed(sampling_order(flow)))
    for k, i in enumerate(order):
        block = flow.blocks[i]
        g = g_all if (block.has_text or "class_embed" in block) else 0.0
        t, cond = _conditioning(flow, block, y, text, B, g)
        rope = flow.rope(block.has_text, h, w, 0 if t is None else t.shape[1])
        seq = tokens[:, ::-1] if block.flip else tokens
        a, b = block.affine(mx.concatenate([seq, seq]) if g > 0 else seq, rope, t, cond)
        s, mu = guided(block, a, b, g)
        z = (seq - mu) / s
        tokens = z[:, ::-1] if block.flip else z
        mx.eval(tokens)
        yield k + 1, len(order)
    return flow.unpatchify(tokens, h, w)


def invert(flow: Flow, x, y=None, guidance: float = 0.0) -> mx.array:
    """Data -> the noise that `sample` with the same y and guidance maps back to x.

    Given the finished sequence, every token's guided scale and shift come from one
    causal pass (conditional and unconditional rows together), so each block inverts
    exactly in one parallel pass, in the reverse of the sampling order."""
    steps = invert_steps(flow, x, y, guidance)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value
