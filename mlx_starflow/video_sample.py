"""Sampling a video flow: noise -> clip, the deep block first, then the shallow ones.

The deep block runs over the whole clip, causal over frames: token by token
(sequential) or by Jacobi iterations over chunks of tokens. Jacobi follows the
reference's schedule exactly: chunks of `block_size` tokens while within the first
frame, four times that afterwards; the first iteration of a chunk past the first
frame takes as inputs the tokens one frame earlier (the previous frame as the first
guess of the current one); a chunk stops when its relative change is below the
threshold or after `max_iter` iterations.

With a local attention window of W frames, the deep block's cache holds the text and
W frames: once full, it is emptied, the text fed again and the last `context_length`
finished frames re-encoded (so they sit at the first frame positions), and the next
W - context_length frames are sampled; clips may so be longer than the training
ones. The reference samples a windowed model by Jacobi only, so does this.

Frame-local shallow blocks sample every frame as an image of its own. A clip is
streamed (`streams`): each frame the deep block finishes goes through the shallow
blocks alone, before the deep block's next token, so a frame is out (a preview) while
the next ones are sampled; with Jacobi the clip itself still takes one pass of the
shallow blocks over all frames at once (the reference's stopping rule). Models whose
shallow blocks see the whole clip take the blocks in turn. Guidance is the image rule
(sample.guided) on the deep block.
"""

from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx

from .models.flow import IdentityBlock
from .models.video import VideoFlow
from .sample import (
    Jacobi,
    OptionError,
    block_points,
    check_guidance,
    check_kv_bits,
    is_whole,
    jacobi_chunk,
    jacobi_input,
)


@dataclass
class VideoStep:
    """Where sampling is: `done` of `total` tokens of block `block` are finished.
    `x` is set on the last step only: the finished clip (B, T, H, W, C)."""

    block: int
    done: int
    total: int
    x: Optional[mx.array] = None
    frame: Optional[int] = None  # streamed: frame `frame` has been through every block ...
    frame_x: Optional[mx.array] = None  # ... and is this (B, 1, H, W, C)
    preview: bool = False  # a step of a pass for previews only (Jacobi, streamed)


def _jacobi_frames(block, z, caches, rope, text, guidance, jac: Jacobi, frame: int, window, context):
    """Jacobi over one block's tokens z (B', N, D) in its own order, `frame` tokens a
    frame; window/context in tokens (None: no local window). Generator: yields (tokens
    done, current) after each chunk, current(start, end) the tokens so far; returns x (B', N, D)."""
    B, N, _ = z.shape
    x_full = jacobi_input(block, z)
    target = N if window is None else min(N, window)
    start = 0
    while True:
        while start < target:
            size = min(jac.block_size if start <= frame else 4 * jac.block_size, target - start)
            src = start - frame if start > frame else None  # the first guess: the frame before's tokens
            for _ in jacobi_chunk(block, x_full, z, start, size, caches, rope, None, guidance, jac, src):
                pass
            start += size
            yield start, lambda a=0, b=N: x_full[:, 1 + a : 1 + b]
        if target >= N:
            break
        target = min(target + window - context, N)
        # Start the cache again: the text, then the last `context` tokens re-encoded.
        for cache in caches:
            cache.offset = 0
        if text is not None:
            block.prefill(text, rope, caches)
        ctx = x_full[:, start + 1 - context : start + 1]
        block.step(jacobi_input(block, ctx[:, :-1]), 0, caches, rope, None)
        mx.eval([c.state for c in caches])
    return x_full[:, 1:]


def _check_window(flow: VideoFlow, frames: int, jacobi, local_attn_window, context_length):
    """(window, context) in frames, or (None, None) without a local window."""
    window = flow.video.local_attn_window if local_attn_window is None else local_attn_window
    if window is None:
        return None, None
    if not is_whole(window) or window < 1:
        raise OptionError("local_attn_window", f"the local attention window must be >= 1 frame, not {window!r}")
    if jacobi is None:
        raise OptionError("jacobi", "a model with a local attention window samples by Jacobi only (as the reference)")
    context = window - 1 if context_length is None else context_length
    if not is_whole(context) or not 0 < context < window:
        raise OptionError(
            "context_length", f"the context must be 1 to {window - 1} frames (the window less one), not {context!r}"
        )
    return window, context


def streams(flow: VideoFlow) -> bool:
    """Whether a clip leaves the sampler frame by frame: the shallow blocks frame-local
    and the deep block's order keeping the frames in time (with `temporal_causal`, or
    unflipped), so a frame the deep block has finished goes through the shallow blocks
    alone, with the numbers it would have among all frames."""
    deep = flow.blocks[-1]
    in_time = bool(flow.video.temporal_causal) or not deep.flip
    return flow.video.shallow_block_local and not isinstance(deep, IdentityBlock) and in_time


def sample_video_steps(
    flow: VideoFlow,
    noise,
    y=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    context_length: Optional[int] = None,
    local_attn_window: Optional[int] = None,
    stream: Optional[bool] = None,
    kv_bits: Optional[int] = None,
) -> Iterator[VideoStep]:
    """Noise (B, T, H, W, C) -> clip, one VideoStep per token or Jacobi chunk. y: the
    text embeddings, B rows, or 2B rows [conditional; unconditional] when guidance > 0.
    local_attn_window (frames) overrides the model's; context_length (frames, default
    the window less one) is what a full window keeps. kv_bits (8 or 4): the deep block's
    KV cache quantized (cache.QuantizedKVCache). Stop iterating to cancel.

    stream: each frame through the shallow blocks as soon as the deep block has
    finished it, then a VideoStep with `frame` set, before the deep block's next token
    (models that `stream` only). Sequential sampling streams by default: a frame alone
    gives the numbers it gives among all frames. Jacobi streams when asked, for
    previews: a frame's Jacobi chunks stop on its own change, where the reference's
    stop on the change over all frames at once, so the clip itself still comes from
    one pass of the shallow blocks over every frame after the deep block; the steps of
    the previews' passes have `preview` set. The cost of streaming, at the release's
    shapes: the shallow blocks' multiply-adds are 12% of the guided deep block's either
    way, but their weights are read for each frame instead of once for all frames, so
    where a step is bound by reading the weights, sequential streaming reads 23% more
    than the deep block (1% batched) and Jacobi's previews about 80% more (as many
    iterations assumed)."""
    w_all = check_guidance(guidance)
    check_kv_bits(kv_bits)
    flow.check_input(noise, "noise")
    cfg = flow.config
    B = noise.shape[0]
    text = None
    if cfg.txt_dim:
        text = flow.check_text(y, 2 * B if w_all > 0 else (y.shape[0] if y is not None else B))
        if w_all == 0 and text.shape[0] == 2 * B:
            text = text[:B]
        elif w_all == 0 and text.shape[0] != B:
            raise ValueError(f"{text.shape[0]} rows of text embeddings for a batch of {B}")
    if stream is None:
        stream = jacobi is None and streams(flow)
    elif stream and not streams(flow):
        raise ValueError("this model cannot stream frames: its shallow blocks are not frame-local")
    h, w = flow.grid(noise)
    tokens = flow.patchify(noise).astype(mx.float32)
    _, T, F, D = tokens.shape
    window, context = _check_window(flow, T, jacobi, local_attn_window, context_length)
    n = len(flow.blocks)
    order = [i for i in [n - 1] + list(range(n - 2, -1, -1)) if not isinstance(flow.blocks[i], IdentityBlock)]

    def loop_of(i, seq, frames):
        """Block i's loop over seq (rows, N, D) in natural order: yields (done, current),
        returns x in the block's order (rows doubled when guided)."""
        block = flow.blocks[i]
        g = w_all if block.has_text else 0.0
        t = (text if g > 0 else text[:B]) if block.has_text else None
        L = 0 if t is None else t.shape[1]
        rope = flow.rope(h, w, frames, L)
        z = flow.order(seq, frames, block.flip)
        if g > 0:
            z = mx.concatenate([z, z])
        deep = i == n - 1
        win = window * F if deep and window is not None else None
        length = L + (z.shape[1] if win is None else min(win, z.shape[1]))
        caches = block.new_caches(z.shape[0], length, kv_bits if deep else None)
        if t is not None:
            block.prefill(t, rope, caches)
        if jacobi is None:
            return block_points(block, z, caches, rope, None, g, compile_step=False)
        return _jacobi_frames(block, z, caches, rope, t, g, jacobi, F, win, None if win is None else context * F)

    def run(i, seq, frames, start=0, total=None, preview=False):
        """Block i over seq (rows, N, D), a VideoStep per token (start + done of total);
        returns its output (rows, N, D) in natural order."""
        rows, N = seq.shape[:2]
        loop = loop_of(i, seq, frames)
        while True:
            try:
                done, _ = next(loop)
            except StopIteration as stop:
                return flow.order(stop.value[:rows], frames, flow.blocks[i].flip)
            if done < N:
                yield VideoStep(i, start + done, total or N, preview=preview)

    def every_frame(blocks, tokens):
        """The blocks in turn over all frames at once; the last step carries the clip."""
        for k, i in enumerate(blocks):
            if flow.is_local(i):
                seq, frames = tokens.reshape(B * T, F, D), 1
            else:
                seq, frames = tokens.reshape(B, T * F, D), T
            tokens = (yield from run(i, seq, frames)).reshape(B, T, F, D)
            last = k == len(blocks) - 1
            yield VideoStep(i, seq.shape[1], seq.shape[1], flow.unpatchify(tokens, h, w) if last else None)

    if not stream:
        yield from every_frame(order, tokens)
        return

    # The deep block over the clip; each frame it finishes goes through the shallow blocks at once.
    top, shallow = order[0], order[1:]
    flip = flow.blocks[top].flip
    loop = loop_of(top, tokens.reshape(B, T * F, D), T)
    previews = jacobi is not None
    finished = []  # each frame after every block (B, F, D)
    while True:
        try:
            done, current = next(loop)
        except StopIteration as stop:
            deep = flow.order(stop.value[:B], T, flip)
            break
        yield VideoStep(top, done, T * F)
        while (len(finished) + 1) * F <= done:
            f = len(finished)
            x = flow.order(current(f * F, (f + 1) * F)[:B], 1, flip)  # the deep block's order undone
            for i in shallow:
                x = yield from run(i, x, 1, f * F, T * F, previews)
                yield VideoStep(i, (f + 1) * F, T * F, preview=previews)
            mx.eval(x)
            finished.append(x)
            last = shallow[-1] if shallow else top
            frame_x = flow.unpatchify(x[:, None], h, w)
            yield VideoStep(last, (f + 1) * F, T * F, frame=f, frame_x=frame_x, preview=previews)
    if previews and shallow:
        yield from every_frame(shallow, deep.reshape(B, T, F, D))
    else:
        yield VideoStep(shallow[-1] if shallow else top, T * F, T * F, flow.unpatchify(mx.stack(finished, 1), h, w))


def sample_video(
    flow: VideoFlow,
    noise,
    y=None,
    guidance: float = 0.0,
    *,
    jacobi: Optional[Jacobi] = None,
    context_length: Optional[int] = None,
    local_attn_window: Optional[int] = None,
) -> mx.array:
    """Run sample_video_steps to the end: the clip (B, T, H, W, C)."""
    x = None
    for step in sample_video_steps(
        flow,
        noise,
        y,
        guidance,
        jacobi=jacobi,
        context_length=context_length,
        local_attn_window=local_attn_window,
    ):
        x = step.x if step.x is not None else x
    return x
