"""Hostile checkpoints, safetensors files and configs: every one is refused with one
line naming the file and the key, never a crash, a traceback or bytes from outside
a buffer."""

import io
import json
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import yaml
from helpers import save_reference, tiny_flow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_starflow.loading.safetensors_reader import load_safetensors, read_header
from mlx_starflow.loading.torch_reader import CheckpointError, load_pth
from mlx_starflow.loading.weights import convert_starflow, load_flow, read_config, save_model
from mlx_starflow.models.config import ConfigError, FlowConfig

ROOT = Path(__file__).resolve().parents[1]


# -- crafted .pth files ------------------------------------------------------------


def entries(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rewrite(path, files):
    """Write a stored (uncompressed) zip of {name: bytes}, as torch.save does."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def patched_pickle(tmp_path, tensors, edit, name="x.pth"):
    """torch.save `tensors`, then let `edit(pickle bytes)` rewrite the pickle."""
    path = tmp_path / name
    torch.save(tensors, path)
    files = entries(path)
    pkl = next(n for n in files if n.endswith("data.pkl"))
    files[pkl] = edit(files[pkl])
    return rewrite(path, files)


def view_pickle(size, stride, offset=0, numel=16, key="w", state=None):
    """A data.pkl of one float tensor `key` viewing storage '0' of `numel` floats
    (`state`: then set on the rebuilt tensor by a BUILD opcode)."""

    class Rebuild:
        def __reduce__(self):
            args = (Storage(), offset, size, stride, False, {})
            return (torch._utils._rebuild_tensor_v2, args) + ((state,) if state else ())

    class Storage:
        pass

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({key: Rebuild()})
    return buf.getvalue()


def crafted_view(tmp_path, size, stride, offset=0, numel=16, data_floats=16):
    files = {
        "x/data.pkl": view_pickle(size, stride, offset, numel),
        "x/data/0": np.arange(data_floats, dtype=np.float32).tobytes(),
        "x/version": b"3\n",
    }
    return rewrite(tmp_path / "view.pth", files)


def lie_about_size(path, name, size):
    """Patch an entry's uncompressed size in its local header and the central directory."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        struct.pack_into("<I", raw, zf.getinfo(name).header_offset + 22, size)
    pos = raw.find(b"PK\x01\x02")
    while raw[pos + 46 : pos + 46 + len(name)] != name.encode():
        pos = raw.find(b"PK\x01\x02", pos + 4)
    struct.pack_into("<I", raw, pos + 24, size)
    path.write_bytes(bytes(raw))


def refused(path, *words, error=CheckpointError):
    with pytest.raises(error) as e:
        load_pth(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_honest_crafted_view_reads(tmp_path):
    got = load_pth(crafted_view(tmp_path, (4, 4), (4, 1)))
    np.testing.assert_array_equal(got["w"], np.arange(16, dtype=np.float32).reshape(4, 4))
    got = load_pth(crafted_view(tmp_path, (4, 4), (1, 4)))
    np.testing.assert_array_equal(got["w"], np.arange(16, dtype=np.float32).reshape(4, 4).T)


@pytest.mark.parametrize(
    "size, stride, offset, words",
    [
        ((64, 64), (1000, 1000), 0, ["'w'", "reaches element"]),  # was SIGSEGV
        ((16, 16), (16, 1), 0, ["'w'", "reaches element 255"]),  # was heap bytes
        ((16,), (1,), 1, ["'w'", "reaches element 16"]),
        ((4,), (1,), 17, ["'w'", "offset 17"]),
        ((-4, 4), (4, 1), 0, ["'w'", "size"]),
        ((4, 4), (-4, 1), 0, ["'w'", "stride"]),
        ((2**40,), (0,), 0, ["'w'", "size"]),
        ((4, 4), (4,), 0, ["'w'", "same length"]),
        ((4.0, 4), (4, 1), 0, ["'w'", "size"]),
        ((1,) * 40, (1,) * 40, 0, ["'w'", "dimensions"]),
        ((2**30, 2**30), (0, 0), 0, ["'w'", "add up"]),  # a stride-0 repeat of one float
    ],
)
def test_views_outside_their_storage(tmp_path, size, stride, offset, words):
    refused(crafted_view(tmp_path, size, stride, offset), *words)


def test_storage_sizes_must_match_their_entries(tmp_path):
    # the pickle claims 16 floats, the entry holds 8
    refused(crafted_view(tmp_path, (8,), (1,), numel=16, data_floats=8), "x/data/0", "holds 32 bytes", "needs 64")
    # the pickle claims 4 floats of a 16-float entry
    refused(crafted_view(tmp_path, (4,), (1,), numel=4, data_floats=16), "x/data/0", "holds 64 bytes", "needs 16")


def test_inflate_bomb_is_refused_without_inflating(tmp_path):
    zeros = b"\0" * (64 << 20)  # 64 MB of zeros deflate to about 64 KB
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/data.pkl", view_pickle((len(zeros) // 4,), (1,), numel=len(zeros) // 4))
        zf.writestr("x/data/0", zeros)
    refused(path, "x/data/0", "zip bomb")

    # The directory lies: it declares 64 bytes, the entry inflates to 64 MB. The read
    # stops at the declared size (and the CRC of the truncated data fails).
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/data.pkl", view_pickle((16,), (1,)))
        zf.writestr("x/data/0", zeros)
    lie_about_size(path, "x/data/0", 64)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(path, "cannot read checkpoint")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (after - before) * 1024 < 32 << 20  # nowhere near the 64 MB it inflates to


@pytest.mark.parametrize(
    "obj, words",
    [
        ([1, 2], ["holds a list"]),
        ({"w": [1, 2]}, ["'w' is a list"]),
        ({"w": 3}, ["'w' is a int"]),
        ({1: 2}, ["a key is a int"]),
    ],
)
def test_pickles_that_are_not_dicts_of_tensors(tmp_path, obj, words):
    refused(patched_pickle(tmp_path, {"a": torch.zeros(1)}, lambda _: pickle.dumps(obj, protocol=2)), *words)


def test_pickled_code_and_unknown_storages_refused(tmp_path):
    evil = pickle.dumps({"w": __import__("os").getcwd}, protocol=2)
    refused(patched_pickle(tmp_path, {"a": torch.zeros(1)}, lambda _: evil), "refusing to load 'posix.getcwd'")
    untyped = view_pickle((4,), (1,)).replace(b"FloatStorage", b"QuintStorag")
    refused(rewrite(tmp_path / "u.pth", {"x/data.pkl": untyped, "x/data/0": b"\0" * 64}), "refusing to load")
    # BUILD on a rebuilt tensor would rewrite its size after the checks
    built = view_pickle((4,), (1,), state={"size": (64, 64), "stride": (1000, 1000)})
    refused(rewrite(tmp_path / "b.pth", {"x/data.pkl": built, "x/data/0": b"\0" * 64}), "pickled state")


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02\x8e" + struct.pack("<Q", 2**60) + b".",  # BINBYTES8 of 2^60 bytes
        b"\x80\x02X" + struct.pack("<I", 2**31) + b".",  # BINUNICODE of 2 GB
        b"\x80\x02}r" + struct.pack("<I", 2**31 - 1) + b".",  # a memo index of 2^31
    ],
)
def test_pickle_lengths_and_memo_indices_are_not_allocated(tmp_path, pkl):
    refused(rewrite(tmp_path / "p.pth", {"x/data.pkl": pkl}), "cannot read checkpoint")


def test_a_flat_state_dict_and_training_wrappers_still_read(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save({"model": m.state_dict(), "epoch": 3, "optimizer": {"lr": [0.1]}}, tmp_path / "w.pth")
    got = load_pth(tmp_path / "w.pth")
    assert sorted(got) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    np.testing.assert_array_equal(got["0.weight"], m[0].weight.detach().numpy())
    t = torch.zeros(1).expand(5)
    torch.save({"e": t, "tied": m[0].weight, "tied2": m[0].weight}, tmp_path / "e.pth")
    got = load_pth(tmp_path / "e.pth")
    assert got["e"].shape == (5,) and np.array_equal(got["tied"], got["tied2"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_pth_reader(tmp_path, data):
    """Any bytes: tensors or a CheckpointError. Mutations of a real checkpoint's pickle
    and zip reach deeper than random bytes."""
    path = tmp_path / "base.pth"
    if not path.exists():
        torch.save({"a": torch.randn(3, 4), "b": torch.randn(5, 6)[:, ::2], "h": torch.ones(2).half()}, path)
    base = path.read_bytes()
    files = entries(path)
    pkl_name = next(n for n in files if n.endswith("data.pkl"))
    mode = data.draw(st.sampled_from(["pickle", "zip", "random"]))
    if mode == "pickle":
        pkl = bytearray(files[pkl_name])
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(pkl) - 1))
            pkl[i] = data.draw(st.integers(0, 255))
        files[pkl_name] = bytes(pkl)
        blob = None
    elif mode == "zip":
        blob = bytearray(base)
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    else:
        blob = data.draw(st.binary(max_size=2048))
    target = tmp_path / "fuzz.pth"
    if blob is None:
        rewrite(target, files)
    else:
        target.write_bytes(bytes(blob))
    try:
        out = load_pth(target)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    for v in out.values():
        assert isinstance(v, (np.ndarray, mx.array))


# -- crafted safetensors headers -----------------------------------------------------


def safetensors_file(path, header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731


@pytest.mark.parametrize(
    "header, data, length, words",
    [
        ({}, b"", 2**40, ["header length 1099511627776"]),
        ({}, b"", 2**63, ["header length 9223372036854775808"]),
        ([1, 2], b"", None, ["JSON list"]),
        (b'{"a": ', b"", None, ["not valid JSON"]),
        (b'{"a": {}, "a": {}}', b"", None, ["'a' appears twice"]),
        (b"[" * 50000 + b"]" * 50000, b"", None, ["not valid JSON"]),
        (b'{"a": ' + b"9" * 5000 + b"}", b"", None, ["not valid JSON"]),
        ({"a": F32([2], 0, 8), "b": F32([2], 4, 12)}, b"\0" * 12, None, ["'a' and 'b' overlap"]),
        ({"a": F32([4], 0, 16)}, b"\0" * 8, None, ["'a'", "outside the data section"]),
        ({"a": F32([-1], 0, 4)}, b"\0" * 4, None, ["'a'", "shape [-1]"]),
        ({"a": F32([1.5], 0, 4)}, b"\0" * 4, None, ["'a'", "not a list of integers"]),
        ({"a": F32("4", 0, 4)}, b"\0" * 4, None, ["'a'", "not a list of integers"]),
        ({"a": F32([2**32] * 3, 0, 0)}, b"", None, ["'a'", "sizes must be"]),
        ({"a": F32([2], 0, 4)}, b"\0" * 4, None, ["'a'", "needs 8"]),
        ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, ["'a'", "'Q9'"]),
        ({"a": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, ["'a'", "'F64'"]),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, ["'a'", "data_offsets"]),
        ({"a": F32([1], -4, 0)}, b"\0" * 4, None, ["'a'", "outside"]),
        ({"a": F32([1], 4, 8)}, b"\0" * 8, None, ["'a'"]),  # a hole: the library refuses it
        ({"__metadata__": {"x": 1}}, b"", None, ["'__metadata__'"]),
    ],
)
def test_safetensors_headers(tmp_path, header, data, length, words):
    path = safetensors_file(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as e:
        load_safetensors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_safetensors_written_by_mlx_pass(tmp_path):
    w = {"a": mx.arange(6).reshape(2, 3).astype(mx.float32), "b": mx.ones((4,), dtype=mx.bfloat16)}
    mx.save_safetensors(str(tmp_path / "m.safetensors"), w, metadata={"format": "mlx"})
    got = load_safetensors(tmp_path / "m.safetensors")
    assert np.array_equal(np.array(got["a"]), np.array(w["a"])) and got["b"].dtype == mx.bfloat16
    assert read_header(tmp_path / "m.safetensors")["a"]["shape"] == [2, 3]
    mx.save_safetensors(str(tmp_path / "n.safetensors"), w)  # "__metadata__": null
    assert sorted(load_safetensors(tmp_path / "n.safetensors")) == ["a", "b"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path, data):
    path = tmp_path / "ok.safetensors"
    if not path.exists():
        mx.save_safetensors(str(path), {"a": mx.ones((2, 3)), "b": mx.zeros((5,), dtype=mx.int32)})
    blob = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    else:
        blob = bytearray(data.draw(st.binary(max_size=512)))
    target = tmp_path / "fuzz.safetensors"
    target.write_bytes(bytes(blob))
    try:
        out = load_safetensors(target)
        mx.eval(list(out.values()))
    except CheckpointError as e:
        assert "\n" not in str(e)


# -- hostile configs -----------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    model, _ = tiny_flow()
    from mlx.utils import tree_flatten

    return save_model(tmp_path / "m", model.config, dict(tree_flatten(model.parameters())))


def with_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    new = edit(cfg)
    path.write_text(json.dumps(cfg if new is None else new))
    return path


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(layers_per_block=[1, 1, 1, 1e7]), ["'layers_per_block'"]),
        (lambda c: c.update(layers_per_block=[1, 1, 1, 10**7]), ["'layers_per_block'"]),
        (lambda c: c.update(layers_per_block=[1] * 1000), ["'layers_per_block'"]),
        (lambda c: c.update(patch_size=0), ["'patch_size'", "1..64"]),
        (lambda c: c.update(num_heads=0), ["'num_heads'"]),
        (lambda c: c.update(top_num_heads=0), ["'top_num_heads'"]),
        (lambda c: c.update(channels="128"), ["'channels'", "an integer", "'128'"]),
        (lambda c: c.update(channels=1e7), ["'channels'", "an integer"]),
        (lambda c: c.update(channels=[128]), ["'channels'", "an integer"]),
        (lambda c: c.update(input_size=10**6), ["'input_size'"]),
        (lambda c: c.update(head_dim=-8), ["'head_dim'"]),
        (lambda c: c.update(noise_std="a"), ["'noise_std'"]),
        (lambda c: c.update(rope="yes"), ["'rope'"]),
        (lambda c: c.update(class_names=[1, 2]), ["'class_names'"]),
        (lambda c: c.update(quantization={"bits": "4"}), ["'quantization'"]),
        (lambda c: [c], ["JSON object", "not a list"]),
        (lambda c: c.update(channels=2048, top_channels=2048), ["'layers_per_block'", "implies at least"]),
    ],
)
def test_hostile_config_json(folder, edit, words):
    path = with_config(folder, edit)
    with pytest.raises(ConfigError) as e:
        load_flow(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg


def test_config_json_that_is_not_json(folder):
    (folder / "config.json").write_text('{"channels": ' + "[" * 100000)
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        read_config(folder)
    (folder / "config.json").write_text('{"channels": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        read_config(folder)


def test_the_size_check_passes_honest_folders(folder):
    cfg = read_config(folder)
    assert 0 < cfg.min_weight_count() * 2 <= (folder / "model.safetensors").stat().st_size
    load_flow(folder)


@pytest.mark.parametrize(
    "line, words",
    [
        ({"patch_size": 0}, ["'patch_size'"]),
        ({"head_dim": 0}, ["'head_dim'"]),
        ({"channels": "abc"}, ["'channels'"]),
        ({"channels": [128]}, ["'channels'"]),
        ({"layers_per_block": "1 1 1 1e7"}, ["'layers_per_block'"]),
        ({"layers_per_block": "1 1 1 10000000"}, ["'layers_per_block'"]),
        ({"blocks": 10**12, "layers_per_block": "1"}, ["'blocks'"]),
        ({"img_size": 10**6}, ["'input_size'"]),
        ({"rope": "maybe"}, ["'maybe'"]),
        ({"noise_std": "x"}, ["'noise_std'"]),
    ],
)
def test_hostile_reference_yaml(tmp_path, line, words):
    model, args = tiny_flow()
    ckpt, cfg = save_reference(model, {**args, **line}, tmp_path)
    with pytest.raises(ConfigError) as e:
        convert_starflow(ckpt, cfg, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and str(cfg) in msg, msg
    for w in words:
        assert w in msg, msg
    assert not (tmp_path / "out").exists()


def test_flow_config_from_dict_checks_types():
    with pytest.raises(ConfigError, match="'channels' must be an integer"):
        FlowConfig.from_dict({"channels": "128"})
    with pytest.raises(ConfigError, match="JSON object"):
        FlowConfig.from_dict(["channels"])


# -- the command line ----------------------------------------------------------------


def test_convert_command_refuses_a_crafted_pth_in_one_line(tmp_path):
    model, args = tiny_flow()
    src = tmp_path / "src"
    src.mkdir()
    _, cfg = save_reference(model, args, src)
    bad = crafted_view(tmp_path, (64, 64), (1000, 1000))
    cmd = [sys.executable, "-m", "mlx_starflow.convert", "starflow", "--checkpoint", str(bad), "--config", str(cfg)]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'w'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    assert yaml.safe_load(cfg.read_text())  # untouched


@pytest.mark.parametrize(
    "shapes, says",
    [
        ({"blocks.x.proj_in.weight": (8, 12)}, "blocks.x.proj_in.weight"),
        ({"blocks.": (1,)}, "no layer number"),
        ({"blocks.0.attn_blocks.a.w": (2, 2)}, "blocks.0.attn_blocks.a.w"),
        (
            {"blocks.0.proj_in.weight": (8,), "blocks.0.proj_out.weight": (24, 8), "blocks.0.pos_embed": (4, 8)},
            "blocks.0.proj_in.weight",
        ),
        (
            {
                "blocks.0.proj_in.weight": (64, 12),
                "blocks.0.proj_out.weight": (24, 64),
                "blocks.0.pos_embed": (4, 64),
                "blocks.0.attn_blocks.0.attn.qkv.weight": (192, 64),
            },
            "mlp.main.0.weight",
        ),
    ],
)
def test_tarflow_shapes_name_the_bad_key(shapes, says):
    """A TarFlow state dict is read from its key names: a key without a layer number, a
    missing or non-matrix tensor is a ConfigError naming it, never a bare ValueError."""
    from mlx_starflow.models.config import tarflow_config_from_shapes

    with pytest.raises(ConfigError, match=re.escape(says)):
        tarflow_config_from_shapes(shapes)
