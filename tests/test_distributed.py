"""Several processes on this machine as an mx.distributed group (the ring backend on
127.0.0.1 only): batch-parallel images byte-identical to one process, pipeline-parallel
latents equal to one process, and a rank that dies or cannot connect stopping the
others with a clear error and no file. Every group runs under a hard timeout."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_flow
from mlx.utils import tree_flatten
from PIL import Image

from mlx_starflow import distributed
from mlx_starflow.images import read_metadata
from mlx_starflow.loading.weights import load_flow, save_model
from mlx_starflow.pipeline import Pipeline
from mlx_starflow.sample import Jacobi, sample

PROMPTS = ["red circle", "green square", "blue triangle", "yellow circle", "red square"]
TIMEOUT = 90  # seconds for any one group, then every process of it is killed


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_group(tmp_path, commands, timeout=TIMEOUT, env=None, connect_timeout=30):
    """Start one process per command as ranks 0.. of a ring on 127.0.0.1 (the hostfile
    mlx.launch would write); returns [(returncode, stdout, stderr)] once all ended.
    Past the timeout every process (and its children) is killed and the test fails."""
    ports = free_ports(len(commands))
    hostfile = tmp_path / f"hosts-{ports[0]}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = []
    for rank, cmd in enumerate(commands):
        e = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            MLX_RANK=str(rank),
            MLX_HOSTFILE=str(hostfile),
            **{distributed.CONNECT_TIMEOUT_ENV: str(connect_timeout)},
            **(env or {}),
        )
        out, err = (open(tmp_path / f"rank{rank}-{ports[0]}.{s}", "w+") for s in ("out", "err"))
        procs.append((subprocess.Popen(cmd, env=e, stdout=out, stderr=err, start_new_session=True), out, err))
    deadline = time.monotonic() + timeout
    try:
        for p, _, _ in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the group did not finish within {timeout} s")
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for p, out, err in procs:
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def cli(*args):
    return [sys.executable, "-m", "mlx_starflow.generate", *args, "--no-progress"]


def pixels(paths):
    return np.stack([np.array(Image.open(p)) for p in paths])


def assert_ok(results):
    for rank, (code, _out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{err[-3000:]}"


# -- batch parallel -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_reference():
    """Five prompts x two seeds in one process: pixels and latents."""
    r = Pipeline.from_pretrained("demo").generate(PROMPTS, num_images=2, seed=5, denoise="none")
    return np.stack([np.array(im) for im in r.images]), np.array(r.latents), r.seeds


def test_demo_batch_parallel_under_mlx_launch(tmp_path, demo_reference):
    # As a user runs it: mlx.launch starts two local processes; prompts from a file
    (tmp_path / "prompts.txt").write_text("\n".join(["red circle", "", "  green square  "] + PROMPTS[2:]) + "\n")
    out = tmp_path / "img-{index}.png"
    port = free_ports(1)[0]
    env = dict(os.environ, **{distributed.CONNECT_TIMEOUT_ENV: "30"})
    cmd = [
        str(Path(sys.executable).parent / "mlx.launch"),
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(port),
        "--",
        *cli(
            "--model",
            "demo",
            "--prompt-file",
            str(tmp_path / "prompts.txt"),
            "--num-images",
            "2",
            "--seed",
            "5",
            "--denoise",
            "none",
            "--output",
            str(out),
            "--verbose",
        ),
    ]
    try:
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mlx.launch did not finish within {TIMEOUT} s")
    assert r.returncode == 0, r.stderr[-3000:]
    paths = [tmp_path / f"img-{i}.png" for i in range(10)]
    assert sorted(tmp_path.glob("*.png")) == sorted(paths)  # written once, by rank 0
    pix, _, seeds = demo_reference
    assert np.array_equal(pixels(paths), pix)
    meta = [read_metadata(p) for p in paths]
    assert [m["prompt"] for m in meta] == [p for p in PROMPTS for _ in range(2)]
    assert [m["seed"] for m in meta] == seeds
    assert "rank 1" in r.stderr and "gather" in r.stderr  # --verbose: each rank's time


def test_demo_batch_parallel_three_ranks_api(tmp_path, demo_reference):
    # uneven shares (4, 3, 3); every rank returns the whole group's result
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from mlx_starflow import distributed
        g = distributed.init()
        pipe = distributed.load("demo", g)
        r = pipe.generate(%r, num_images=2, seed=5, denoise="none")  # over the group it was loaded on
        np.savez(sys.argv[1] + f"-{g.rank()}.npz", pixels=np.stack([np.array(i) for i in r.images]),
                 latents=np.array(r.latents), seeds=np.array(r.seeds))
        print(r.timings)
        # the benchmark's figures: each rank's images and seconds, the group's rate
        t = distributed.throughput(pipe, g, ["red circle", "blue square"], num_images=2, seed=1, denoise="none")
        print("throughput", [(x["rank"], x["images"]) for x in t["ranks"]], t["images"], t["images_per_minute"] > 0)
        print("hop", distributed.hop_seconds(g, pipe.config, repeats=3) > 0)
    """
        % PROMPTS
    )
    results = run_group(tmp_path, [[sys.executable, "-c", script, str(tmp_path / "out")]] * 3)
    assert_ok(results)
    pix, lat, seeds = demo_reference
    for rank in range(3):
        got = np.load(tmp_path / f"out-{rank}.npz")
        assert np.array_equal(got["pixels"], pix) and np.array_equal(got["latents"], lat)
        assert got["seeds"].tolist() == seeds
    assert all(f"'rank {r}'" in results[0][1] for r in range(3))
    assert "throughput [(0, 2), (1, 1), (2, 1)] 4 True" in results[0][1] and "hop True" in results[0][1]


@pytest.fixture(scope="module")
def release(tmp_path_factory, cache):
    """The tiny end-to-end release (T5, tokenizer, SD-VAE, reference .pth and YAML)
    with a deep block of 6 layers; `cache` (test_pipeline's) is its convert-once cache."""
    from tiny_release import make_release

    root = tmp_path_factory.mktemp("release")
    make_release(root, layers_per_block="1 0 1 6")
    return root


@pytest.fixture(scope="module")
def release_pipe(release):
    return Pipeline.from_pretrained(str(release))


@pytest.mark.parametrize("ranks,sampler", [(3, "sequential"), (2, "jacobi")])
def test_release_batch_parallel(tmp_path, release, release_pipe, ranks, sampler):
    ref = release_pipe.generate(PROMPTS, num_images=2, seed=11, sampler=sampler)  # with the score denoising step
    out = tmp_path / "img-{seed}.png"
    args = cli(
        "--model",
        str(release),
        "--prompt",
        *PROMPTS,
        "--num-images",
        "2",
        "--seed",
        "11",
        "--output",
        str(out),
        "--metadata",
        "--sampler",
        sampler,
    )
    results = run_group(tmp_path, [args] * ranks)
    assert_ok(results)
    paths = [tmp_path / f"img-{s}.png" for s in range(11, 21)]
    assert sorted(tmp_path.glob("img-*.png")) == sorted(paths) and len(list(tmp_path.glob("img-*.json"))) == 10
    assert np.array_equal(pixels(paths), np.stack([np.array(i) for i in ref.images]))
    assert results[0][1].split() == [str(p) for p in paths] and all(not r[1] for r in results[1:])


# -- pipeline parallel -------------------------------------------------------------------------

PIPELINE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, numpy as np, mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_starflow import distributed
    from mlx_starflow.sample import Jacobi, sample_steps
    folder, sampler, out = sys.argv[1:4]
    g = distributed.init()
    flow = distributed.load_part(folder, g)
    inputs = np.load(folder + "/inputs.npz")
    noise, y = mx.array(inputs["noise"]), mx.array(inputs["y"])
    jacobi = Jacobi(4, 1e-3, 8) if sampler == "jacobi" else None
    for i, step in enumerate(sample_steps(flow, noise, y, 2.0, jacobi=jacobi)):
        if i == 3 and sys.argv[4:] == ["hang"]:  # stop answering, as a machine gone to sleep
            os.kill(os.getpid(), signal.SIGSTOP)
    x = step.x
    if g.rank() == 0:
        np.save(out, np.array(x))
    layers = flow.blocks[-1].layers
    weights = sum(v.nbytes for _, v in tree_flatten(flow.parameters()))
    print(layers.start, layers.stop, len(flow.blocks[-1].attn_blocks), weights)
""")


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    """A small STARFlow whose deep block has 6 layers, as a converted folder, with a
    batch of noise and guided text rows."""
    folder = tmp_path_factory.mktemp("six") / "model"
    flow, _ = tiny_flow(layers_per_block="1 0 1 6", img_size=64)  # 8x8 latents: 64 tokens
    save_model(folder, flow.config, dict(tree_flatten(flow.parameters())))
    rng = np.random.default_rng(3)
    cfg = flow.config
    noise = rng.normal(size=(2, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    y = rng.normal(size=(4, cfg.txt_size, cfg.txt_dim)).astype(np.float32)
    np.savez(folder / "inputs.npz", noise=noise, y=y)
    return folder, mx.array(noise), mx.array(y)


@pytest.mark.parametrize("ranks,sampler", [(2, "sequential"), (3, "jacobi"), (3, "sequential")])
def test_pipeline_parallel_latents_equal_one_process(tmp_path, six_layers, ranks, sampler):
    folder, noise, y = six_layers
    jacobi = Jacobi(4, 1e-3, 8) if sampler == "jacobi" else None
    want = np.array(sample(load_flow(folder), noise, y, 2.0, jacobi=jacobi))
    out = tmp_path / "x.npy"
    results = run_group(tmp_path, [[sys.executable, "-c", PIPELINE_SCRIPT, str(folder), sampler, str(out)]] * ranks)
    assert_ok(results)
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)
    # contiguous layer ranges covering the 6 layers, rank 0 (which also holds the shallow
    # blocks) taking fewer; each rank holds only its own weights, as rank_bytes predicts
    flow = load_flow(folder)
    ranges = [tuple(map(int, r[1].split()[-4:])) for r in results]
    assert [r[:2] for r in ranges] == [(x.start, x.stop) for x in distributed.placement(flow, ranks)]
    assert ranges[0][1] - ranges[0][0] < 6 // ranks and ranges[-1][1] == 6
    assert all(n == stop - start for start, stop, n, _ in ranges)
    predicted = distributed.rank_bytes(flow.config, ranks, dtype=mx.float32)
    assert [r[3] for r in ranges] == [p["weights"] for p in predicted]
    full = sum(v.nbytes for _, v in tree_flatten(flow.parameters()))
    assert distributed.rank_bytes(flow.config, 1, dtype=mx.float32)[0]["weights"] == full


def test_pipeline_parallel_command_line(tmp_path, release, release_pipe):
    # the release's default denoising is the score step: its gradient crosses the ranks too
    ref = release_pipe.generate(PROMPTS[:2], num_images=2, seed=3)
    assert ref.params["denoise"] == "score"
    args = cli(
        "--model",
        str(release),
        "--prompt",
        *PROMPTS[:2],
        "--num-images",
        "2",
        "--seed",
        "3",
        "--pipeline-parallel",
        "--output",
        str(tmp_path / "p-{index}.png"),
    )
    results = run_group(tmp_path, [args] * 2)
    assert_ok(results)
    paths = [tmp_path / f"p-{i}.png" for i in range(4)]
    assert np.array_equal(pixels(paths), np.stack([np.array(i) for i in ref.images]))


def test_pipeline_parallel_score_denoising_equals_one_process(tmp_path, six_layers):
    folder, noise, y = six_layers
    x = noise * 0.5
    want = np.array(load_flow(folder).denoise(x, y[:2]))
    script = textwrap.dedent("""
        import sys, numpy as np, mlx.core as mx
        from mlx_starflow import distributed
        folder, out = sys.argv[1:3]
        g = distributed.init()
        flow = distributed.load_part(folder, g)
        inputs = np.load(folder + "/inputs.npz")
        x, y = mx.array(inputs["noise"]) * 0.5, mx.array(inputs["y"])[:2]
        if g.rank() == 0:
            np.save(out, np.array(flow.denoise(x, y)))
        else:
            distributed.follow_denoise(flow, 2, (8, 8))
    """)
    results = run_group(tmp_path, [[sys.executable, "-c", script, str(folder), str(tmp_path / "d.npy")]] * 3)
    assert_ok(results)
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), want, rtol=0, atol=1e-5)


def test_pipeline_parallel_cancel_leaves_the_group_usable(tmp_path, release, release_pipe):
    script = textwrap.dedent("""
        import sys, numpy as np
        from mlx_starflow import distributed
        from mlx_starflow.pipeline import Cancelled
        g = distributed.init()
        pipe = distributed.load(sys.argv[1], g, pipeline_parallel=True)
        stop = lambda stage, done, total: not (g.rank() == 0 and stage == "deep" and 0 < done < total)
        try:
            pipe.generate("a cat", seed=1, denoise="none", progress=stop, group=g)
        except Cancelled as e:
            print("cancelled", e)
        r = pipe.generate("a cat", seed=1, denoise="none", group=g)
        np.save(sys.argv[2] + f"-{g.rank()}.npy", np.array(r.latents))
    """)
    results = run_group(tmp_path, [[sys.executable, "-c", script, str(release), str(tmp_path / "x")]] * 2)
    assert_ok(results)
    assert all("cancelled" in out for _, out, _ in results)
    want = release_pipe.generate("a cat", seed=1, denoise="none").latents
    for rank in range(2):
        assert np.array_equal(np.load(tmp_path / f"x-{rank}.npy"), np.array(want))


# -- failures ---------------------------------------------------------------------------------


def test_a_rank_that_hangs_stops_the_others(tmp_path, six_layers):
    # rank 1 stops answering in the middle of sampling (a machine asleep): rank 0 gives up
    # after the step timeout instead of waiting forever
    folder = six_layers[0]
    ports = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            MLX_RANK=str(rank),
            MLX_HOSTFILE=str(hostfile),
            **{distributed.CONNECT_TIMEOUT_ENV: "30", distributed.STEP_TIMEOUT_ENV: "3"},
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    PIPELINE_SCRIPT,
                    str(folder),
                    "sequential",
                    str(tmp_path / "x.npy"),
                    *(["hang"] if rank else []),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    try:
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode == 1 and "made no progress for 3 s" in err, err
        assert not (tmp_path / "x.npy").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_rank_that_cannot_connect_stops_with_a_clear_error(tmp_path):
    # rank 1 of the hostfile never starts: rank 0 gives up after the connect timeout
    ports = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile), **{distributed.CONNECT_TIMEOUT_ENV: "3"})
    start = time.monotonic()
    r = subprocess.run(
        cli("--model", "demo", "--prompt", "red circle", "--output", str(tmp_path / "x.png")),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert time.monotonic() - start < 30
    assert r.returncode != 0 and "could not join the group within 3 s" in r.stderr
    assert not list(tmp_path.glob("*.png"))


# The command line, dying at its 3rd progress report (in the middle of sampling).
DIES = textwrap.dedent("""
    import os, sys
    from mlx_starflow import generate
    calls = []
    def report(self, stage, done, total):
        calls.append(stage)
        if len(calls) == 3:
            os._exit(3)
        return True
    generate.Bars.__call__ = report
    sys.exit(generate.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("mode", ["batch", "pipeline"])
def test_a_rank_that_dies_stops_the_others_without_files(tmp_path, release, mode):
    args = cli(
        "--model",
        str(release),
        "--prompt",
        *PROMPTS,
        "--num-images",
        "2",
        "--seed",
        "1",
        "--denoise",
        "none",
        "--output",
        str(tmp_path / "img-{index}.png"),
    )
    if mode == "pipeline":
        args.append("--pipeline-parallel")
    start = time.monotonic()
    results = run_group(
        tmp_path, [args, [sys.executable, "-c", DIES, *args[3:]]], timeout=60, env={distributed.STEP_TIMEOUT_ENV: "5"}
    )
    assert time.monotonic() - start < 60
    code, _, err = results[0]
    # the lost connection is noticed, or (MLX's ring can wait forever on a dead peer) the stall
    assert code == 1 and ("lost its connection to the group" in err or "made no progress for 5 s" in err), err
    assert "Traceback" not in err
    assert results[1][0] == 3
    assert not list(tmp_path.glob("img-*")) and not list(tmp_path.glob(".img-*"))


def test_ranks_asked_different_things_refuse(tmp_path):
    base = cli("--model", "demo", "--num-images", "1", "--seed", "1", "--output", str(tmp_path / "x-{index}.png"))
    results = run_group(tmp_path, [base + ["--prompt", "red circle"], base + ["--prompt", "blue square"]])
    assert all(code == 1 and "not asked the same thing" in err for code, _, err in results), results
    assert not list(tmp_path.glob("*.png"))


def test_single_process_unchanged_and_pipeline_needs_a_group(tmp_path):
    assert distributed.init() is None  # no launcher: no group, nothing started
    r = subprocess.run(
        cli("--model", "demo", "--prompt", "red circle", "--pipeline-parallel", "--output", str(tmp_path / "x.png")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "mlx.launch" in r.stderr and not list(tmp_path.glob("*.png"))
    assert distributed.shares(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert distributed.shares(1, 2) == [range(0, 1), range(1, 1)]


def test_prompt_file_mistakes(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    for path, match in ((tmp_path / "none.txt", "cannot read it"), (tmp_path / "empty.txt", "no prompt in it")):
        r = subprocess.run(
            cli("--model", "demo", "--prompt-file", str(path)), capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_benchmark_under_the_launcher_reports_ranks_and_rate(tmp_path):
    out = tmp_path / "group.json"
    cmd = [
        sys.executable,
        "-m",
        "mlx_starflow.benchmark",
        "--model",
        "demo",
        "--group-images",
        "3",
        "--cfg",
        "1",
        "--json",
        str(out),
    ]
    results = run_group(tmp_path, [cmd, cmd])
    assert_ok(results)
    r = json.loads(out.read_text())
    assert r["images"] == 3 and r["ranks_in_group"] == 2 and r["images_per_minute"] > 0
    assert [(x["rank"], x["images"]) for x in r["ranks"]] == [(0, 2), (1, 1)]
    assert "rank 1: 1 images" in results[0][1] and "images per minute" in results[0][1]
    # without a launcher: a clear error, no traceback
    single = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 1 and "start the benchmark with mlx.launch" in single.stderr
    assert "Traceback" not in single.stderr
