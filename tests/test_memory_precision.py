"""The whole command's memory and the precision chosen for the machine (issue 22):
the one-shot order (Pipeline's low_memory: the command's peak is its largest stage's,
not the sum of the models), and `--dtype auto`'s policy (loading/precision_policy.py)."""

import gc
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_release import make_release

from mlx_starflow.loading import precision_policy as pp
from mlx_starflow.models.t5 import T5Config, T5Encoder
from mlx_starflow.models.vae import VAE, VAEConfig
from mlx_starflow.pipeline import Pipeline
from mlx_starflow.tools.random_models import ARCHS, flow_config, flow_spec

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    # a flow wide enough that its weights outweigh the other stages' memory
    make_release(root, img_size=32, vae_channels=(8, 8, 8, 8), channels=128, head_dim=32)
    return root


def test_one_shot_peak_is_the_largest_stage_not_the_sum(release, cache):
    kw = dict(seed=1, guidance=2.0, sampler="sequential")
    resident = Pipeline.from_pretrained(str(release))
    r = resident.generate("a cat", **kw)
    flow, vae = nbytes(resident.flow), nbytes(resident.vae)
    text = resident._text_loader()
    t5 = nbytes(text.model)
    text.release()
    del resident, text
    gc.collect()
    mx.clear_cache()

    mx.reset_peak_memory()
    pipe = Pipeline.from_pretrained(str(release), low_memory=True)
    loading = mx.get_peak_memory()
    o = pipe.generate("a cat", **kw)
    # the same image either way
    np.testing.assert_array_equal(np.array(o.latents), np.array(r.latents))
    np.testing.assert_array_equal(np.asarray(o.images[0]), np.asarray(r.images[0]))
    assert set(o.stage_peaks) == {"text", "deep", "shallow", "denoise", "decode"}
    # nothing heavy is loaded before the call; the call's peak is its largest stage's
    assert loading < flow / 10
    assert o.peak_memory == max(o.stage_peaks.values())
    # one-shot: the text encoder and the VAE never sit beside the flow
    assert o.stage_peaks["text"] < flow and o.stage_peaks["decode"] < flow
    # resident: the flow (and the VAE) are held while the text encoder encodes and the VAE decodes
    assert r.stage_peaks["text"] >= flow + t5 and r.stage_peaks["decode"] >= flow + vae
    assert o.peak_memory < r.peak_memory
    # the resident peak is (at least) the sum of the stages' own memories, the one-shot peak their max
    assert r.peak_memory >= o.stage_peaks["decode"] + flow - vae
    # the pipeline stays usable, and loads what it freed again
    again = pipe.generate("a cat", **kw)
    np.testing.assert_array_equal(np.array(again.latents), np.array(o.latents))


def test_low_memory_score_and_encode(release, cache):
    pipe = Pipeline.from_pretrained(str(release), low_memory=True)
    img = pipe.generate("a dog", seed=2, guidance=0.0, sampler="sequential").images[0]
    res = pipe.score([img], ["a dog", "a cat"])
    resident = Pipeline.from_pretrained(str(release))
    want = resident.score([img], ["a dog", "a cat"])
    np.testing.assert_allclose(np.array(res.bits_per_dim), np.array(want.bits_per_dim), rtol=1e-5)
    assert pipe.vae is None  # the encoder was freed after encoding


def test_commands_run_one_shot_and_say_the_precision(release, cache, tmp_path):
    out = tmp_path / "x.png"
    cmd = [sys.executable, "-m", "mlx_starflow.generate", "--model", str(release), "--prompt", "a cat"]
    r = subprocess.run(
        cmd + ["--seed", "1", "--output", str(out), "--sampler", "sequential", "--no-progress", "--verbose"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("precision:")]
    assert len(line) == 1 and "flow float32, text encoder float32" in line[0] and "one-shot" in line[0], r.stderr
    assert out.is_file()


def shapes_3b() -> pp.Shapes:
    """The released 3B's shapes (nothing allocated), as the policy reads a converted folder."""
    flow = pp.sizes_of({k: ("F32", v) for k, v in flow_spec("3b").items()})
    t5 = T5Encoder(T5Config(**ARCHS["3b"]["t5"]))
    text = pp.sizes_of({k: ("F32", tuple(v.shape)) for k, v in tree_flatten(t5.parameters())})
    vae = VAE(VAEConfig(**ARCHS["3b"]["vae"]))
    vae.encoder = None
    v = pp.sizes_of({k: ("F32", tuple(x.shape)) for k, x in tree_flatten(vae.parameters())})
    return pp.Shapes.of_config(flow_config("3b"), flow, text, v)


def test_the_3b_estimates_match_the_measured_peaks():
    s = shapes_3b()
    # weights as measured (BENCHMARKS.md): 15.43 / 7.72 / 4.11 / 2.18 GB, T5-XL 4.89 GB float32
    for (d, bits), want in zip(pp.candidates(s, gpu=False), (15.43, 7.72, 4.11, 2.18)):
        assert s.flow.bytes(d, bits) / GB == pytest.approx(want, abs=0.02)
    assert s.text.bytes("float32") / GB == pytest.approx(4.89, abs=0.02)
    peaks = pp.stage_peaks(s, "float32", None, "float32", None, gpu=False)
    assert pp.whole_peak(peaks, one_shot=True) / GB == pytest.approx(17.31, rel=0.03)  # sampling + denoising
    assert pp.whole_peak(peaks, one_shot=False) / GB == pytest.approx(20.6, rel=0.03)  # generate, resident
    peaks = pp.stage_peaks(s, "bfloat16", 4, "float32", 8, gpu=False)
    assert pp.whole_peak(peaks, one_shot=True) / GB == pytest.approx(3.08, rel=0.05)


@pytest.mark.parametrize(
    "gpu, memory, flow, text",
    [
        (False, 8, "8-bit", "8-bit"),
        (False, 16, "bfloat16", "bfloat16"),
        (False, 24, "float32", "float32"),
        (True, 5.3, "4-bit", "8-bit"),  # an 8 GB Mac's recommended working set
        (True, 8, "8-bit", "8-bit"),
        (True, 16, "bfloat16", "bfloat16"),
        (True, 24, "bfloat16", "bfloat16"),  # a GPU never takes float32 for the 3B
    ],
)
def test_auto_picks_for_the_device_and_memory(gpu, memory, flow, text):
    c = pp.choose(shapes_3b(), gpu=gpu, available=memory * GB, source="test")
    assert c.label() == f"flow {flow}, text encoder {text}", c.line
    assert c.peak + max(pp.MIN_MARGIN, pp.MARGIN * memory * GB) <= memory * GB
    assert c.line.startswith("precision: ") and ("GPU" if gpu else "CPU") in c.line and "fits" in c.line


def test_explicit_choices_win_and_the_text_encoder_follows():
    s = shapes_3b()
    c = pp.choose(s, gpu=False, available=24 * GB, quantize=4)
    assert (c.dtype, c.quantize, c.text_dtype, c.text_quantize) == ("bfloat16", 4, "float32", 8)
    c = pp.choose(s, gpu=False, available=24 * GB, quantize=4, text_quantize=4)
    assert c.text_quantize == 4
    c = pp.choose(s, gpu=True, available=64 * GB, dtype="float32", text_dtype="float32")
    assert (c.dtype, c.text_dtype, c.text_quantize) == ("float32", "float32", None)
    c = pp.choose(s, gpu=False, available=24 * GB, dtype="bfloat16")
    assert (c.dtype, c.text_dtype) == ("bfloat16", "bfloat16")
    # nothing fits: the smallest, said plainly
    c = pp.choose(s, gpu=True, available=2 * GB)
    assert c.quantize == 4 and "does NOT fit" in c.line


def test_this_machine_picks_float32_for_the_3b():
    available, source = pp.memory()
    assert available > 0 and source
    if not mx.default_device() == mx.cpu or available < 20 * GB:
        pytest.skip(f"not a CPU with 20 GB free ({available / GB:.1f} GB {source})")
    c = pp.choose(shapes_3b())
    assert c.label() == "flow float32, text encoder float32" and "float32 is the fastest on a CPU" in c.line


def _cgroup(tmp_path, lines, files):
    tmp_path.mkdir(parents=True)
    proc = tmp_path / "cgroup"
    proc.write_text("\n".join(lines) + "\n")
    for name, text in files.items():
        f = tmp_path / "fs" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return proc, tmp_path / "fs"


def test_a_cgroup_limit_is_the_memory_a_container_gives(tmp_path):
    # v2: the process's cgroup has no limit of its own, its parent (the container) 16 GB, of
    # which 3 GB are used, 1 GB of it page cache (reclaimable): 14 GB left
    proc, root = _cgroup(
        tmp_path / "v2",
        ["0::/box/app"],
        {
            "box/app/memory.max": "max\n",
            "box/app/memory.current": "1000\n",
            "box/memory.max": f"{16 * 10**9}\n",
            "box/memory.current": f"{3 * 10**9}\n",
            "box/memory.stat": f"anon {2 * 10**9}\nfile {10**9}\n",
            "memory.max": "max\n",
        },
    )
    assert pp.cgroup_room(proc, root) == (14e9, "the cgroup's memory.max")
    # v1: the memory controller's own hierarchy; "no limit" is a number near 2^63
    proc, root = _cgroup(
        tmp_path / "v1",
        ["4:memory:/job", "3:cpuset:/", "0::/"],
        {
            "memory/job/memory.limit_in_bytes": f"{16 * 2**30}\n",
            "memory/job/memory.usage_in_bytes": f"{2**30}\n",
            "memory/job/memory.stat": f"cache {2**29}\nrss {2**29}\n",
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
        },
    )
    room, source = pp.cgroup_room(proc, root)
    assert room == 16 * 2**30 - 2**29 and source == "the cgroup's memory.limit_in_bytes"
    # no limit anywhere, or no cgroup file at all: nothing to say
    proc, root = _cgroup(tmp_path / "none", ["0::/"], {"memory.max": "max\n"})
    assert pp.cgroup_room(proc, root) is None
    assert pp.cgroup_room(tmp_path / "missing", root) is None


def test_an_rlimit_is_the_memory_a_process_may_take(tmp_path):
    import resource

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmSize:\t 2000000 kB\nVmData:\t 500000 kB\n")
    limits = {resource.RLIMIT_AS: (16 * 10**9, resource.RLIM_INFINITY)}

    def getrlimit(which):
        return limits.get(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    assert pp.rlimit_room(getrlimit, status) == (16e9 - 2048e6, "RLIMIT_AS")
    limits[resource.RLIMIT_DATA] = (8 * 10**9, resource.RLIM_INFINITY)
    assert pp.rlimit_room(getrlimit, status) == (8e9 - 512e6, "RLIMIT_DATA")
    assert pp.rlimit_room(lambda which: (resource.RLIM_INFINITY,) * 2, status) is None


def test_the_policy_fits_in_a_16_gb_container(monkeypatch):
    # A 24 GB machine whose container gives 16 GB: the choice fits the container, not the machine.
    if not mx.default_device() == mx.cpu:
        pytest.skip("the CPU's policy")
    monkeypatch.setattr(pp, "system_memory", lambda: (22.5 * GB, "MemAvailable"))
    monkeypatch.setattr(pp, "cgroup_room", lambda: (15.5 * GB, "the cgroup's memory.max"))
    monkeypatch.setattr(pp, "rlimit_room", lambda: None)
    available, source = pp.memory()
    assert source == "the cgroup's memory.max" and available == 15.5 * GB
    c = pp.choose(shapes_3b())
    assert c.label() == "flow bfloat16, text encoder bfloat16" and "the cgroup's memory.max" in c.line
    monkeypatch.setattr(pp, "rlimit_room", lambda: (7 * GB, "RLIMIT_AS"))
    assert pp.memory() == (7 * GB, "RLIMIT_AS")


def test_the_pipeline_records_the_choice(release, cache):
    pipe = Pipeline.from_pretrained(str(release))
    assert pipe.info["precision"].startswith("precision: flow float32")  # small and on a CPU
    assert pipe.info["text_dtype"] == "float32"
    pipe = Pipeline.from_pretrained(str(release), dtype="bfloat16")
    assert pipe.info["text_dtype"] == "bfloat16" and pipe.info["dtype"] == "bfloat16"
    pipe = Pipeline.from_pretrained(str(release), dtype="float32", text_dtype="float32")
    assert "precision" not in pipe.info
