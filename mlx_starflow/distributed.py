"""Several Macs: generation over an `mx.distributed` group started by `mlx.launch`.

    mlx.launch --hosts mac1,mac2 -- python -m mlx_starflow.generate --prompt-file prompts.txt --num-images 8

Batch parallel (the default in a group): every rank loads the whole model and
samples its own contiguous share of the (prompt, seed) pairs; the images are then
gathered, so every rank returns the group's Result and rank 0 writes the files.
An image depends only on its prompt and seed (its noise comes from its own seed,
and sampling is row by row), so the images are those of one machine whatever the
group size. Jacobi's stopping rule measures an iteration's change over the whole
batch (Jacobi.change), so GroupJacobi sums that measure over the group: every rank
iterates as one machine would over the whole batch.

Pipeline parallel (`pipeline_parallel=True`, `--pipeline-parallel`): the deep
block's layers are split into contiguous ranges, one per rank, and each rank reads
only its own layers' weights (the safetensors file is loaded lazily). Rank 0 also
holds the shallow blocks, the text encoder, the learned denoiser and the VAE, so it
takes fewer deep layers (`placement` balances the weights); the other ranks hold
their layers and the block's small input and output projections. Per token (or
Jacobi chunk) the hidden state goes from rank to rank with send/recv; every rank
runs the same sampler loop (sample.py) on the last rank's output, which all_gather
shares. KV caches stay with their layers. The score denoising step takes the deep
block's density over the whole sequence rank to rank and its gradient back
(PipelineFlow.denoise with follow_denoise).

Failures: every rank reports how its part went before results are gathered, so a
rank's error (or a cancel) stops every rank with that rank's message. A rank that
dies closes its connections: the others raise GroupError at their next exchange.
MLX's own waits are unbounded, so two timeouts bound them: joining the group
($MLX_STARFLOW_CONNECT_TIMEOUT, a rank that cannot connect exits naming the fix)
and a sampling step waiting for the others ($MLX_STARFLOW_STEP_TIMEOUT).
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .flow import Flow, FlowBlock, IdentityBlock, _rows
from .pipeline import Cancelled, Event, GenerateOptions, Pipeline, Result
from .sample import Jacobi, sample_steps

__all__ = [
    "GroupError",
    "GroupPipeline",
    "init",
    "launched",
    "load",
    "generate_steps",
    "throughput",
    "PipelineBlock",
    "PipelineFlow",
    "follow_denoise",
    "placement",
    "rank_bytes",
    "hop_seconds",
    "shares",
    "broadcast_seeds",
    "on_rank0",
]

CONNECT_TIMEOUT_ENV = "MLX_STARFLOW_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 120.0  # seconds: ranks start together, but ssh and imports take a while
STEP_TIMEOUT_ENV = "MLX_STARFLOW_STEP_TIMEOUT"
DEFAULT_STEP_TIMEOUT = 600.0  # seconds one sampling step may wait for the others (a 3B token on a CPU: ~6)
# Backends by what their launcher sets (mlx.launch for ring and JACCL, mpirun for MPI).
BACKENDS = (
    ("jaccl", ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")),
    ("ring", ("MLX_HOSTFILE",)),
    ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")),
    ("nccl", ("MLX_WORLD_SIZE",)),
)
SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")  # a group's size, where the launcher says it
GO, STOP = 0, 1  # the control word that precedes every hidden state sent down the pipeline


class GroupError(RuntimeError):
    """The group cannot go on: a rank failed or lost its connection, or the ranks disagree."""


class Stopped(Exception):
    """Raised on ranks > 0 of a pipeline when rank 0 stopped sampling (it says why)."""


# -- joining the group --------------------------------------------------------------------


def backend() -> Optional[str]:
    """The backend the launcher prepared this process for, or None (a single process)."""
    for name, keys in BACKENDS:
        if any(k in os.environ for k in keys):
            return name
    return None


def launched() -> bool:
    """True when started by a launcher for a group of more than one process."""
    name = backend()
    if name == "ring":  # mlx.launch gives a single host an empty hostfile
        try:
            return os.path.getsize(os.environ["MLX_HOSTFILE"]) > 2
        except OSError:
            return True  # a missing hostfile: let init name the problem
    sizes = [os.environ[k] for k in SIZES if k in os.environ]
    if sizes and all(v.strip() in ("0", "1") for v in sizes):
        return False  # an MPI or NCCL environment of one process
    return name is not None


# Runs beside a rank while it joins: MLX's connect holds the interpreter until every peer
# answers, so no thread of ours could time it out. Exits quietly once told (or orphaned).
_WATCHDOG = """
import os, select, signal, sys
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout)[0]:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGTERM)
"""


def _seconds(env, default, value=None) -> float:
    value = os.environ.get(env) if value is None else value
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{env} must be a number of seconds > 0, not {value!r}")
    return seconds


class _Stall:
    """Ends this process with a message when an exchange of the sampling loop makes
    no progress for the step timeout: MLX's ring backend can wait forever on a peer
    that died in the middle of an exchange. beat() when an exchange starts, stop()
    when the loop reports progress. (mx.eval releases the interpreter, so a thread
    can watch it.)"""

    def __init__(self):
        self.deadline, self.thread, self.message = None, None, ""

    def beat(self, group):
        timeout = _seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT)
        self.message = (
            f"error: rank {group.rank()} of {group.size()}: sampling made no progress for {timeout:g} s: "
            f"another rank stopped or is unreachable ({STEP_TIMEOUT_ENV} sets the wait)"
        )
        self.deadline = time.monotonic() + timeout
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, daemon=True, name="mlx-starflow-stall")
            self.thread.start()

    def stop(self):
        self.deadline = None

    def _watch(self):
        while True:
            time.sleep(0.25)
            if self.deadline is not None and time.monotonic() > self.deadline:
                sys.stderr.write(self.message + "\n")
                sys.stderr.flush()
                os._exit(1)


_stall = _Stall()


def init(timeout: Optional[float] = None) -> Optional[mx.distributed.Group]:
    """The group this process was launched into, or None for a single process (no
    launcher, or a launcher with one host). Joining waits at most `timeout` seconds
    (default $MLX_STARFLOW_CONNECT_TIMEOUT, else 120): a rank that cannot reach its
    peers by then prints why and is terminated."""
    if not launched():
        return None
    timeout = _seconds(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT, timeout)
    rank = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
    message = (
        f"error: rank {rank} could not join the group within {timeout:g} s. Check that every host runs "
        f"this same command, that the addresses in the hostfile are the hosts' own and reachable "
        f"from each other, and that no firewall blocks the ports ({CONNECT_TIMEOUT_ENV} sets the wait)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message], stdin=subprocess.PIPE
    )
    try:
        group = mx.distributed.init(strict=True, backend=backend())
    except RuntimeError as e:
        raise GroupError(f"cannot start the distributed group ({backend()} backend): {e}") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()
    return group if group.size() > 1 else None


# -- exchanging small things ------------------------------------------------------------------


def _comm_error(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith(("[ring]", "[jaccl]", "[mpi]", "[nccl]"))


def _lost(group, e) -> GroupError:
    return GroupError(
        f"rank {group.rank()} of {group.size()} lost its connection to the group ({e}): "
        "another rank stopped (see its error) or its machine is unreachable"
    )


def _exchange(group, arrays):
    """Evaluate collectives, turning a lost connection into a GroupError."""
    try:
        mx.eval(arrays)
    except RuntimeError as e:
        if _comm_error(e):
            raise _lost(group, e) from None
        raise
    return arrays


def gather_bytes(group, data: bytes) -> List[bytes]:
    """Every rank's bytes, on every rank."""
    n = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=group)
    lengths = _exchange(group, n).tolist()
    buf = np.zeros(max(lengths), dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(_exchange(group, mx.distributed.all_gather(mx.array(buf)[None], group=group)))
    return [rows[r, :k].tobytes() for r, k in enumerate(lengths)]


def broadcast_seeds(group, seeds: Sequence[int]) -> List[int]:
    """Rank 0's seeds on every rank (each rank may have drawn its own random ones)."""
    if group is None:
        return list(seeds)
    gathered = mx.distributed.all_gather(mx.array(list(seeds), dtype=mx.int64)[None], group=group)
    return _exchange(group, gathered)[0].tolist()


def on_rank0(group, fn):
    """fn() on rank 0 only (everything for a single process), its failure raised on
    every rank: checks of what only rank 0 touches, such as the output files."""
    if group is None:
        return fn()
    return _run_agreed(group, fn if group.rank() == 0 else (lambda: None))


def barrier(group):
    _exchange(group, mx.distributed.all_sum(mx.array([1], dtype=mx.int32), group=group))


def shares(n: int, size: int) -> List[range]:
    """n items split into `size` contiguous ranges, the first n % size one longer."""
    out, start = [], 0
    for r in range(size):
        k = n // size + (r < n % size)
        out.append(range(start, start + k))
        start += k
    return out


def _describe(error: BaseException) -> str:
    if isinstance(error, (Cancelled, Stopped)):
        return "cancelled"
    return f"{type(error).__name__}: {error}"


def agree(group, error: Optional[BaseException] = None, fingerprint: str = "", own: bool = True):
    """Every rank says how its part went (and what it was asked, as a fingerprint).
    If one failed, every rank raises: the failing rank its own error (unless own is
    False), the others a GroupError naming it (Cancelled if it was cancelled); ranks
    asked different things raise a ValueError."""
    try:
        rows = [
            json.loads(b)
            for b in gather_bytes(
                group, json.dumps(["ok" if error is None else _describe(error), fingerprint]).encode()
            )
        ]
    except ValueError:  # another rank was at another exchange
        raise GroupError("the ranks are out of step: every rank must run the same program and options") from None
    if error is not None and not isinstance(error, Stopped):
        if own:
            raise error
        return
    for r, (status, _) in enumerate(rows):
        if status == "cancelled":
            raise Cancelled(f"rank {r} cancelled")
        if status != "ok":
            raise GroupError(f"rank {r} of {group.size()} failed: {status}")
    if error is not None:  # stopped by rank 0 without a reason: should not happen
        raise GroupError(f"rank 0 stopped the group's sampling ({error})")
    differ = [r for r, (_, fp) in enumerate(rows) if fp != rows[0][1]]
    if differ:
        raise ValueError(
            f"the ranks were not asked the same thing (rank {differ[0]} differs from rank 0): "
            "every rank must run the same command with the same options"
        )


def _run_agreed(group, fn):
    """fn() on every rank, then agreement: a failure anywhere raises everywhere."""
    result, error = None, None
    try:
        result = fn()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # shared with the other ranks, then raised here by agree
        error = e
    agree(group, error)
    return result


# -- pipeline parallel: the deep block split by layers ----------------------------------------------


class PipelineBlock(FlowBlock):
    """The deep block on one rank of a pipeline: `attn_blocks` holds only this rank's
    layers (`layers`, a range of the block's layer indices) and their KV caches.

    Rank 0 embeds the inputs; each rank runs its layers and sends the hidden state to
    the next; the last rank's output is shared with all ranks, which apply the head
    and run the same sampler loop. A control word (go or stop, rows, tokens) precedes
    each hidden state, so rank 0 can stop the others cleanly (`abort`)."""

    @classmethod
    def of(cls, block: FlowBlock, group, layers: range) -> "PipelineBlock":
        """The deep block, already holding only `layers` (see _part), as this rank's part."""
        block.__class__ = cls
        block.group, block.layers = group, layers
        return block

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
        shallow = Flow.__new__(Flow)  # a view: the same modules, the deep block left out
        nn.Module.__init__(shallow)
        shallow.blocks, shallow._config = [*self.blocks[:-1], IdentityBlock()], self.config

        def tokens_of(v):
            image, logdet = shallow(v, y, recompute=True)
            return self.patchify(image), logdet

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
    block = FlowBlock(cfg, cfg.num_blocks - 1)
    block.attn_blocks = []  # never computed: parameters are lazy
    block.set_dtype(dtype)
    PipelineBlock.of(block, group, range(0))
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


def _part(cfg, rank: int, size: int):
    """The flow of config cfg as rank `rank` of a pipeline of `size` holds it: the
    deep block with only this rank's contiguous range of layers, and on ranks > 0
    neither the shallow blocks, the denoiser nor the text projection. Returns (flow,
    the range of layers). Parameters are lazy: nothing dropped is ever computed."""
    flow = Flow(cfg)
    top = len(flow.blocks) - 1
    deep = flow.blocks[top]
    layers = placement(flow, size)[rank]
    deep.attn_blocks = deep.attn_blocks[layers.start : layers.stop]
    if rank > 0:
        flow.blocks[:top] = [IdentityBlock() for _ in range(top)]
        if "learnable_self_denoiser" in flow:
            del flow.learnable_self_denoiser
        if "proj_txt" in deep:
            del deep.proj_txt
    return flow, layers


def rank_bytes(cfg, size: int, dtype=mx.bfloat16, quantize=None, batch: int = 1, guided: bool = True) -> List[dict]:
    """Per rank of a pipeline of `size`: the bytes of the flow parameters it holds
    ("weights", in dtype, the transformer linears quantized as the loader does) and of
    its KV caches for the deep block ("kv_cache", a batch of images, doubled when
    guided). Computed from the shapes: nothing is allocated."""
    from .quant import quant_args, quantize_linear

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


def _load_part(path, group, dtype=None, quantize=None) -> Flow:
    """A converted folder's flow with only this rank's share of the deep block's
    layers (rank 0 also keeps the shallow blocks and the denoiser), through
    weights.load_flow: only the kept tensors are ever read."""
    from .weights import load_flow

    def part(cfg):
        flow, layers = _part(cfg, group.rank(), group.size())
        top = len(flow.blocks) - 1
        PipelineBlock.of(flow.blocks[top], group, layers)
        if group.rank() == 0:
            flow.__class__ = PipelineFlow
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


class GroupPipeline(Pipeline):
    """A Pipeline loaded on every rank of a group (see load): generate and
    generate_steps share the work over that group unless given another."""

    group = None

    def generate_steps(self, prompt, *, group=None, **options):
        return super().generate_steps(prompt, group=self.group if group is None else group, **options)


class _NoText:
    """The text 'encoder' of ranks > 0 in a pipeline: only rank 0 embeds the prompt,
    the others need the embeddings' shape alone."""

    def __init__(self, cfg):
        self.shape = (cfg.txt_size, cfg.txt_dim)

    def encode(self, prompts):
        return mx.zeros((len(prompts), *self.shape))

    def release(self):
        pass


def _pipeline_part(where, group, model, **options) -> Pipeline:
    """This rank's pipeline of a pipeline-parallel group: rank 0 a whole Pipeline
    around its part of the flow, the others their part of the flow alone."""

    def flow_loader(path, dtype, quantize):
        return _load_part(path, group, dtype=dtype, quantize=quantize)

    if group.rank() == 0:
        pipe = GroupPipeline.from_pretrained(model, **options, flow_loader=flow_loader)
    else:
        from . import device
        from .pipeline import _auto_dtype
        from .quant import quant_args

        dtype = _auto_dtype(where.flow) if options["dtype"] == "auto" else options["dtype"]
        q = quant_args(
            {"bits": options["quantize"], "group_size": options["q_group_size"]} if options["quantize"] else None
        )
        flow = device.prepare(flow_loader(where.flow, dtype, q))
        info = {"model": str(model), "flow": str(where.flow), "dtype": dtype, "quantize": options["quantize"]}
        pipe = GroupPipeline(flow, (lambda: _NoText(flow.config)) if flow.config.txt_dim else None, None, info=info)
    pipe.info["pipeline_parallel"] = group.size()
    return pipe


def load(model: Optional[str] = None, group=None, pipeline_parallel: bool = False, **kwargs) -> Pipeline:
    """Pipeline.from_pretrained on every rank of `group` (same arguments): a
    GroupPipeline, whose generate shares the work over the group. Rank 0 resolves the
    model first (a download or a conversion happens once, into a cache the others
    may share), then the others. With pipeline_parallel each rank loads only its
    share of the deep block (see PipelineBlock). A failure on any rank raises on
    every rank."""
    from .hub import DEFAULT_MODEL, resolve

    model = DEFAULT_MODEL if model is None else model
    if group is None:
        if pipeline_parallel:
            raise ValueError("pipeline parallel needs a group of several processes: start them with mlx.launch")
        return Pipeline.from_pretrained(model, **kwargs)
    names = ("checkpoint", "config", "text_encoder", "vae")

    def find():
        return resolve(model, **{k: kwargs.get(k) for k in names})

    # Rank 0 resolves alone first: a download or a conversion into a cache that the
    # ranks may share (one machine, a network folder) must not race.
    on_rank0(group, find)
    if not pipeline_parallel:
        pipe = _run_agreed(group, lambda: GroupPipeline.from_pretrained(model, **kwargs))
        pipe.group = group
        return pipe
    options = dict(
        dtype="auto",
        quantize=None,
        q_group_size=64,
        text_dtype="float32",
        text_quantize=None,
        vae_dtype="float32",
        keep_text_encoder=False,
        vae_tile=None,
    )
    unknown = set(kwargs) - set(options) - set(names)
    if unknown:
        raise TypeError(f"unknown loading option(s) {', '.join(sorted(unknown))}")
    options.update({k: v for k, v in kwargs.items() if k in options})

    def part():
        return _pipeline_part(find(), group, model, **options, **{k: kwargs.get(k) for k in names})

    pipe = _run_agreed(group, part)
    pipe.group = group
    return pipe


# -- generation in a group ---------------------------------------------------------------------


def _fingerprint(opts: GenerateOptions, seeded: bool, mode: str) -> str:
    """What a rank was asked, as a digest: every rank of a group must be asked the same."""
    fields = {k: getattr(opts, k) for k in GenerateOptions.names() if k not in ("latents", "seed")}
    fields.update(mode=mode, seed=list(opts.seed) if seeded else None)
    if opts.latents is not None:
        fields["latents"] = hashlib.sha256(np.array(opts.latents).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def generate_steps(pipe: Pipeline, group, opts: GenerateOptions) -> Iterator[Event]:
    """Pipeline.generate_steps(..., group=group): every rank makes the same call and
    gets its own events, then a last one whose Result holds the whole group's images,
    latents and seeds, in order, on every rank. Batch parallel, unless the pipeline
    was loaded pipeline-parallel (load). Result.timings holds each stage's slowest
    rank, "rank N" each rank's own seconds and "gather" the exchange; peak_memory is
    the largest rank's. Options are checked, and compared across the ranks, before
    the first event."""
    seeded = opts.seed is not None or opts.latents is not None
    block = pipeline_block(pipe.flow)
    mode = "batch"
    if block is not None:
        mode = f"pipeline {group.size()}"
        if (block.group.rank(), block.group.size()) != (group.rank(), group.size()):
            raise ValueError("this pipeline was loaded pipeline-parallel on another group")

    resolved, error = None, None
    try:
        resolved = pipe.resolve_options(opts)
    except (ValueError, TypeError) as e:
        error = e
    agree(group, error, "" if error else _fingerprint(resolved, seeded, mode))
    opts = resolved
    if not seeded:  # each rank drew its own random seeds: rank 0's count
        opts.seed = broadcast_seeds(group, opts.seed)
    if block is None:
        return _batch(pipe, group, opts)
    return _pipelined(pipe, group, opts, block)


def _local(group, events, on_close=None):
    """Run this rank's part (a generator of Events), passing its events on; returns
    (its Result or None, its error or None, seconds). A lost connection raises; a
    consumer that stops iterating (a cancel) is reported to the group first."""
    result, error, start = None, None, time.perf_counter()
    try:
        for event in events:
            _stall.stop()
            if event.result is None:
                yield event
            else:
                result = event.result
    except GeneratorExit:
        if on_close:
            on_close()
        agree(group, Cancelled("cancelled"), own=False)
        raise
    except (KeyboardInterrupt, GroupError):  # no exchange after a lost connection: it could wait forever
        raise
    except Exception as e:
        if _comm_error(e):
            raise _lost(group, e) from None
        if on_close and not isinstance(e, Stopped):
            on_close()
        error = e
    finally:
        _stall.stop()
    return result, error, time.perf_counter() - start


class GroupJacobi(Jacobi):
    """Jacobi sampling whose stopping rule sees the whole group's batch. The rule
    measures an iteration's change over the whole batch (as the reference does), so
    a rank judging its own share alone would stop at other iterations than one
    process sampling every image: sum the squares over the group instead."""

    def __init__(self, jacobi: Jacobi, group):
        super().__init__(jacobi.block_size, jacobi.threshold, jacobi.max_iter)
        self.group = group

    def change(self, new, old):
        _stall.beat(self.group)
        sums = mx.stack([mx.sum(mx.square(new - old)), mx.sum(mx.square(new))])
        total = mx.distributed.all_sum(sums, group=self.group)
        return total[0] / total[1]


@dataclass
class _GroupOptions(GenerateOptions):
    """A rank's share of a batch-parallel call: Jacobi decided over the whole group."""

    group: object = None

    @property
    def jacobi(self):
        jacobi = GenerateOptions.jacobi.fget(self)
        return None if jacobi is None else GroupJacobi(jacobi, self.group)


def _batch(pipe, group, opts):
    part = shares(len(opts.batch_prompts), group.size())[group.rank()]
    events = iter(())
    shared = opts.sampler == "jacobi"  # then every rank takes part in every iteration
    if shared:
        opts = _GroupOptions(**{f.name: getattr(opts, f.name) for f in fields(GenerateOptions)}, group=group)
    if len(part):
        mine = replace(
            opts,
            prompts=[opts.batch_prompts[i] for i in part],
            num_images=1,
            seed=[opts.seed[i] for i in part] if opts.seed else None,
            latents=None if opts.latents is None else opts.latents[part.start : part.stop],
        )
        events = Pipeline.generate_steps(pipe, mine)  # this rank alone
    elif shared:
        events = _follow(pipe, opts, empty=True)
    result, error, seconds = yield from _local(group, events)
    agree(group, error)
    yield Event("decode", 1, 1, result=_gather(pipe, group, opts, result, seconds))


def _pipelined(pipe, group, opts, block):
    if group.rank() == 0:
        finished = []  # the exchanges are over on every rank: nothing to stop any more
        last = "denoise" if opts.denoise == "score" else "deep"  # the score step crosses the ranks too

        def watch(events):
            for event in events:
                if event.stage == last and event.done == event.total:
                    finished.append(True)
                yield event

        result, error, seconds = yield from _local(
            group, watch(Pipeline.generate_steps(pipe, opts)), on_close=lambda: None if finished else block.abort()
        )
    else:
        result, error, seconds = yield from _local(group, _follow(pipe, opts))
        if error is not None and not isinstance(error, Stopped):
            raise error  # mid-pipeline: rank 0 cannot be told; it stops when this process ends
    agree(group, error)
    yield Event("decode", 1, 1, result=_gather(pipe, group, opts, result, seconds))


def _follow(pipe, opts, empty=False):
    """The sampler loop alone, for a rank that takes part in every exchange of it
    but whose images are made elsewhere: ranks > 0 of a pipeline (on the same noise
    as rank 0; the text is only a shape there, rank 0 embeds it), and with `empty`,
    a batch-parallel rank without images (a batch of none) in the group's Jacobi
    decisions."""
    mx.reset_peak_memory()
    if empty:
        cfg = pipe.config
        x = mx.zeros((0, *pipe.latent_shape(opts.height, opts.width)))
        y = mx.zeros((0, cfg.txt_size, cfg.txt_dim)) if pipe.classes is None else pipe.classes.encode([])
    else:
        y, _ = pipe.conditioning(opts.batch_prompts, opts.negative_prompt, opts.guidance > 0)
        x = (
            opts.latents
            if opts.latents is not None
            else pipe.noise(opts.seed, pipe.latent_shape(opts.height, opts.width))
        )
    for step in sample_steps(pipe.flow, x, y, opts.guidance, jacobi=opts.jacobi):
        yield Event("deep", step.done, step.total, step)
    if opts.denoise == "score" and not empty:
        p = pipe.config.patch_size
        follow_denoise(pipe.flow, x.shape[0], (x.shape[1] // p, x.shape[2] // p))


STAGE_NAMES = ("text", "deep", "shallow", "denoise", "decode")


def _gather(pipe, group, opts, result: Optional[Result], seconds: float) -> Result:
    """The group's Result on every rank, from each rank's own (None: no images)."""
    from PIL import Image

    t0 = time.perf_counter()
    count = 0 if result is None else len(result.images)
    arrays = [np.asarray(im) for im in result.images] if count else []
    meta = {
        "count": count,
        "seconds": seconds,
        "timings": result.timings if count else {},
        "peak": result.peak_memory if count else mx.get_peak_memory(),
        "params": result.params if count else None,
        "image": [list(arrays[0].shape), result.images[0].mode] if count else None,
    }
    metas = [json.loads(b) for b in gather_bytes(group, json.dumps(meta).encode())]
    first = next(m for m in metas if m["count"])
    shape, mode = first["image"]
    k = max(m["count"] for m in metas)
    lat_shape = pipe.latent_shape(opts.height, opts.width)
    images = np.zeros((k, *shape), dtype=np.uint8)
    latents = np.zeros((k, *lat_shape), dtype=np.float32)
    if count:
        images[:count] = np.stack(arrays)
        latents[:count] = np.array(result.latents.astype(mx.float32))
    all_images, all_latents = _exchange(
        group,
        [
            mx.distributed.all_gather(mx.array(images), group=group),
            mx.distributed.all_gather(mx.array(latents), group=group),
        ],
    )
    keep = [r * k + i for r, m in enumerate(metas) for i in range(m["count"])]
    all_images = np.array(all_images)[keep]
    timings = {
        s: max(m["timings"].get(s, 0.0) for m in metas) for s in STAGE_NAMES if any(s in m["timings"] for m in metas)
    }
    timings.update({f"rank {r}": m["seconds"] for r, m in enumerate(metas)})
    timings["gather"] = time.perf_counter() - t0
    return Result(
        images=[Image.fromarray(a, mode=mode) for a in all_images],
        latents=all_latents[mx.array(keep)],
        seeds=list(opts.seed),
        prompts=list(opts.batch_prompts),
        timings=timings,
        peak_memory=max(m["peak"] for m in metas),
        params=first["params"],
    )


def throughput(pipe: Pipeline, group, prompts, num_images: int = 1, seed=0, **options) -> dict:
    """One timed generation over the group (every rank calls it with the same
    arguments), for the benchmark: {"ranks": [{"rank", "images", "seconds"}],
    "images", "seconds" (the group's, from a barrier to every image gathered),
    "images_per_minute"}, on every rank."""
    barrier(group)
    t0 = time.perf_counter()
    result = pipe.generate(prompts, group=group, num_images=num_images, seed=seed, **options)
    seconds = time.perf_counter() - t0
    n = len(result.images)
    counts = [len(p) for p in shares(n, group.size())]
    if pipeline_block(pipe.flow) is not None:
        counts = [n] + [0] * (group.size() - 1)
    ranks = [{"rank": r, "images": counts[r], "seconds": result.timings[f"rank {r}"]} for r in range(group.size())]
    return {"ranks": ranks, "images": n, "seconds": seconds, "images_per_minute": 60.0 * n / seconds}
