"""Generation over a group: loading a pipeline on every rank, batch parallel (every rank
samples its own share of the (prompt, seed) pairs and the images are gathered), and the
pipeline-parallel loop (every rank runs the sampler, rank 0 the other stages)."""

import hashlib
import json
import time
from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np

from ..loading import device
from ..loading.hub import DEFAULT_MODEL
from ..loading.quant import quant_args
from ..loading.resolve import resolve
from ..options import Cancelled, Event, GenerateOptions, LoadOptions, Result, drive, specs
from ..pipeline import Pipeline, _auto_dtype
from ..sample import Jacobi, sample_steps
from .group import (
    GroupError,
    Stopped,
    _comm_error,
    _exchange,
    _lost,
    _run_agreed,
    _stall,
    agree,
    barrier,
    broadcast_seeds,
    gather_bytes,
    on_rank0,
    shares,
)
from .pipeline_parallel import follow_denoise, load_part, pipeline_block


def _options(prompt, options: dict) -> GenerateOptions:
    unknown = sorted(set(options) - set(GenerateOptions.names()))
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}")
    return prompt if isinstance(prompt, GenerateOptions) else GenerateOptions(prompt, **options)


class GroupPipeline(Pipeline):
    """A Pipeline loaded on every rank of a group (see load): generate and
    generate_steps share the work over that group unless given another."""

    group = None

    def generate(self, prompt, *, progress=None, group=None, **options) -> Result:
        return drive(self.generate_steps(prompt, group=group, **options), progress)

    def generate_steps(self, prompt, *, group=None, after_sampling=None, **options) -> Iterator[Event]:
        group = self.group if group is None else group
        if group is None:
            return super().generate_steps(prompt, after_sampling=after_sampling, **options)
        if after_sampling is not None:
            raise ValueError("after_sampling is not available with a distributed group")
        return generate_steps(self, group, _options(prompt, options))


class Shared:
    """Any loaded pipeline whose generate and generate_steps share the work over a group
    (every rank makes the same calls); its other attributes are the pipeline's."""

    def __init__(self, pipe: Pipeline, group):
        self.pipe, self.group = pipe, group

    def generate_steps(self, prompt, **options) -> Iterator[Event]:
        return generate_steps(self.pipe, self.group, _options(prompt, options))

    def generate(self, prompt, *, progress=None, **options) -> Result:
        return drive(self.generate_steps(prompt, **options), progress)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def share(pipe: Pipeline, group) -> Shared:
    """pipe's generation shared over `group` (None: pipe itself)."""
    return pipe if group is None else Shared(pipe, group)


class _NoText:
    """The text 'encoder' of ranks > 0 in a pipeline: only rank 0 embeds the prompt,
    the others need the embeddings' shape alone."""

    def __init__(self, cfg):
        self.shape = (cfg.txt_size, cfg.txt_dim)

    def encode(self, prompts):
        return mx.zeros((len(prompts), *self.shape))

    def release(self):
        pass


def _pipeline_part(where, group, load: LoadOptions) -> Pipeline:
    """This rank's pipeline of a pipeline-parallel group: rank 0 a whole Pipeline
    around its part of the flow, the others their part of the flow alone."""

    def flow_loader(path, dtype, quantize):
        return load_part(path, group, dtype=dtype, quantize=quantize)

    if group.rank() == 0:
        pipe = GroupPipeline.from_pretrained(**vars(load), flow_loader=flow_loader)
    else:
        q = quant_args({"bits": load.quantize, "group_size": load.q_group_size} if load.quantize else None)
        flow = device.prepare(flow_loader(where.flow, load.dtype, q))
        info = {"model": str(load.model), "flow": str(where.flow), "dtype": load.dtype, "quantize": load.quantize}
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
    model = DEFAULT_MODEL if model is None else model
    if group is None:
        if pipeline_parallel:
            raise ValueError("pipeline parallel needs a group of several processes: start them with mlx.launch")
        return Pipeline.from_pretrained(model, **kwargs)
    load = LoadOptions(model=model, **kwargs).validate()  # an unknown option is a TypeError here
    places = {n: getattr(load, n) for n, _, m in specs(LoadOptions) if m["place"] and n != "model"}

    def find():
        return resolve(model, **places)

    # Rank 0 resolves alone first: a download or a conversion into a cache that the
    # ranks may share (one machine, a network folder) must not race.
    on_rank0(group, find)
    if not pipeline_parallel:
        pipe = _run_agreed(group, lambda: GroupPipeline.from_pretrained(**vars(load)))
        pipe.group = group
        return pipe
    if load.low_memory:
        raise ValueError("pipeline parallel keeps each rank's share loaded: drop low_memory")

    def part():
        where = find()
        # every rank must hold the same precision: "auto" is decided from the folder alone here
        dtype = _auto_dtype(where.flow) if load.dtype == "auto" else load.dtype
        return _pipeline_part(where, group, replace(load, dtype=dtype))

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
    """pipe's generate_steps over `group`: every rank makes the same call and
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
    for step in sample_steps(pipe.flow, x, y, opts.guidance, jacobi=opts.jacobi, kv_bits=opts.kv_bits):
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
    result = drive(generate_steps(pipe, group, GenerateOptions(prompts, num_images=num_images, seed=seed, **options)))
    seconds = time.perf_counter() - t0
    n = len(result.images)
    counts = [len(p) for p in shares(n, group.size())]
    if pipeline_block(pipe.flow) is not None:
        counts = [n] + [0] * (group.size() - 1)
    ranks = [{"rank": r, "images": counts[r], "seconds": result.timings[f"rank {r}"]} for r in range(group.size())]
    return {"ranks": ranks, "images": n, "seconds": seconds, "images_per_minute": 60.0 * n / seconds}
