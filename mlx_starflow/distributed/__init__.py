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

from .batch import GroupPipeline, generate_steps, load, share, throughput
from .group import (
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STEP_TIMEOUT,
    STEP_TIMEOUT_ENV,
    GroupError,
    Stopped,
    barrier,
    broadcast_seeds,
    gather_bytes,
    init,
    launched,
    on_rank0,
    shares,
)
from .pipeline_parallel import (
    PipelineBlock,
    PipelineFlow,
    follow_denoise,
    hop_seconds,
    load_part,
    pipeline_block,
    placement,
    rank_bytes,
)

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_STEP_TIMEOUT",
    "STEP_TIMEOUT_ENV",
    "GroupError",
    "GroupPipeline",
    "Stopped",
    "init",
    "launched",
    "load",
    "share",
    "generate_steps",
    "throughput",
    "PipelineBlock",
    "PipelineFlow",
    "follow_denoise",
    "load_part",
    "pipeline_block",
    "placement",
    "rank_bytes",
    "hop_seconds",
    "shares",
    "barrier",
    "broadcast_seeds",
    "gather_bytes",
    "on_rank0",
]
