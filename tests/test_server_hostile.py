"""The server under hostile input, with the demo model: work that would never end, uploads
that would amplify memory, bodies that would burn CPU or stack, clients that trickle or
leave, signals, and an exposed address without a key. After the battery the server still
serves a correct image, with its memory near where it started.

Every server listens on 127.0.0.1 on a free port (0.0.0.0 only reaches the refusal, which
comes before binding); every request has a timeout and every wait a bound.
"""

import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_server import FAST, client, health, png, request, wait_for

from mlx_starflow import Pipeline
from mlx_starflow.cli import server as server_module
from mlx_starflow.cli.server import MAX_PARTS, Server
from mlx_starflow.images import MAX_IMAGE_PIXELS, open_image, probe
from mlx_starflow.options import MAX_SIDE, GenerateOptions, specs
from mlx_starflow.sample import Jacobi, sample_steps

HANG = {"sampler": "jacobi", "jacobi_threshold": 0, "jacobi_max_iter": 1000, "jacobi_block_size": 1}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def vm_rss() -> int:
    """This process's resident memory in bytes."""
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def battery(pipe):
    """One server for the whole battery, its log records and its RSS after a first request."""
    records = Records()
    logger = logging.getLogger("mlx_starflow.server")
    logger.addHandler(records)
    s = Server(pipe, port=0, max_queue=4, quiet=True).start()
    client(s).images.generate(prompt="red circle", extra_body={"seed": 0, **FAST})  # warm
    wait_for(s, lambda h: h["running"] == 0)
    s.rss_start, s.records = vm_rss(), records.records
    yield s
    s.close()
    logger.removeHandler(records)


def post(server, path: str, body: bytes, content_type: str, timeout: float = 20):
    return request(server, "POST", path, body, {"Content-Type": content_type}, timeout=timeout)


def raw_connection(server, timeout: float = 10) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=timeout)


# -- images built without decoding them -------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zero_png(width: int, height: int, rows: bool = True) -> bytes:
    """An all-black RGB PNG, compressed row by row (never held whole); rows=False: its header
    only, with one row of data (what a decompression bomb's header claims is what counts)."""
    c = zlib.compressobj(9)
    row = bytes(1 + 3 * width)
    idat = b"".join([c.compress(row) for _ in range(height if rows else 1)] + [c.flush()])
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def multipart(parts, boundary: str = "hostileBoundary") -> tuple:
    """[(name, bytes, filename or None, content type or None)] -> (body, Content-Type)."""
    out = []
    for name, data, filename, kind in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if kind:
            head += f"Content-Type: {kind}\r\n"
        out.append(head.encode() + b"\r\n" + data + b"\r\n")
    return b"".join(out) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def red_png() -> bytes:
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# -- the library's parts: Jacobi points to stop at, the image gate --------------------------


def test_jacobi_yields_after_every_iteration_with_the_same_numbers(pipe):
    flow = pipe.flow
    noise = pipe.noise([3], pipe.latent_shape())
    y = pipe.encode(["red circle"])
    jac = Jacobi(block_size=16, threshold=0.0, max_iter=5)
    steps = list(sample_steps(flow, noise, y, 0.0, jacobi=jac))
    deep = [s.done for s in steps if s.block == len(flow.blocks) - 1]
    # 64 tokens in chunks of 16, 5 iterations each: 4 points within a chunk, then the chunk done
    assert deep == [0] * 4 + [16] + [16] * 4 + [32] + [32] * 4 + [48] + [48] * 4 + [64]
    assert steps[3].preview().shape == noise.shape
    # stopping within a chunk stops the work there
    it = sample_steps(flow, noise, y, 0.0, jacobi=Jacobi(16, 0.0, 1000))
    t0 = time.perf_counter()
    for k, _ in enumerate(it):
        if k == 3:
            break
    it.close()
    assert time.perf_counter() - t0 < 5
    # the numbers are those of the run to the end
    again = list(sample_steps(flow, noise, y, 0.0, jacobi=jac))[-1].x
    assert np.array_equal(np.array(steps[-1].x), np.array(again))


def test_images_are_checked_from_their_header_before_decoding():
    assert MAX_IMAGE_PIXELS == MAX_SIDE * MAX_SIDE  # what the models can make, and no more
    header_only = zero_png(9000, 9000, rows=False)
    rss = vm_rss()
    for data in (header_only, zero_png(20000, 20000, rows=False)):
        with pytest.raises(ValueError, match=r"image 1 is .*\d+ pixels\); at most 16777216 pixels \(4096x4096\)"):
            open_image(data, "image 1")
        with pytest.raises(ValueError, match="pixels"):
            probe(data, "image 1")
    assert vm_rss() - rss < 64 << 20
    with pytest.raises(ValueError, match="cannot read junk as an image"):
        open_image(b"not a picture at all", "junk")
    assert open_image(red_png(), "red").size == (32, 32)


# -- the battery -------------------------------------------------------------------------------


def test_limits_are_stated_in_models_and_enforced(battery):
    status, _, card = request(battery, "GET", "/v1/models/demo")
    assert status == 200
    limits = card["limits"]
    for name, _, m in specs(GenerateOptions):
        key = name if m["request"] is True else m["request"]
        if m["request"] and m["high"] is not None and key != "n":
            assert limits[key]["max"] == m["high"] and limits[key]["min"] == m["low"], key
    assert limits["jacobi_max_iter"] == {"min": 1, "max": 1000}
    assert limits["n"] == {"min": 1, "max": 10} and limits["image"]["max_pixels"] == MAX_IMAGE_PIXELS
    before = health(battery)
    for value in (1001, 1e15):
        status, _, body = request(
            battery, "POST", "/v1/images/generations", {"prompt": "red circle", **HANG, "jacobi_max_iter": value}
        )
        assert status == 400 and body["error"]["param"] == "jacobi_max_iter", body
        assert "from 1 to 1000" in body["error"]["message"]
    status, _, body = request(battery, "POST", "/v1/images/generations", {"prompt": "red circle", "guidance": 1e9})
    assert status == 400 and body["error"]["param"] == "guidance"
    assert health(battery)["started"] == before["started"]


def test_a_jacobi_request_that_would_not_end_is_freed_when_its_client_leaves(battery):
    start = health(battery)
    data = json.dumps({"prompt": "red circle", "seed": 1, **HANG}).encode()
    sock = raw_connection(battery)
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    wait_for(battery, lambda h: h["started"] == start["started"] + 1 and h["running"] == 1)
    time.sleep(0.5)  # inside the deep block's first chunk: 1000 iterations of 64 tokens
    t0 = time.monotonic()
    sock.close()
    h = wait_for(battery, lambda h: h["running"] == 0, 10)
    assert time.monotonic() - t0 < 3.0
    assert h["cancelled"] == start["cancelled"] + 1 and h["completed"] == start["completed"]
    r = client(battery).images.generate(prompt="blue square", extra_body={"seed": 2, **FAST})
    assert png(r.data[0].b64_json).size == (32, 32)


def test_a_burst_of_large_dimension_uploads_is_refused_without_decoding(battery):
    big = zero_png(9000, 9000)  # 236 KB; 243 MB once decoded
    assert len(big) < 300_000
    rss0, results, peak, stop = vm_rss(), [], [vm_rss()], threading.Event()

    def send():
        body, kind = multipart(
            [("image", big, "big.png", "image/png"), ("prompt", b"blue circle", None, None)],
        )
        results.append(post(battery, "/v1/images/edits", body, kind))

    def sample():
        while not stop.wait(0.02):
            peak.append(vm_rss())

    watcher = threading.Thread(target=sample)
    watcher.start()
    before = health(battery)
    senders = [threading.Thread(target=send) for _ in range(6)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(timeout=30)
    stop.set()
    watcher.join()
    assert len(results) == 6
    for status, _, body in results:
        assert status == 400 and body["error"]["param"] == "image", body
        assert "81000000 pixels); at most 16777216 pixels" in body["error"]["message"]
    assert max(peak) - rss0 < 300 << 20, (rss0, max(peak))
    h = health(battery)
    assert h["accepted"] == before["accepted"] and h["invalid"] == before["invalid"] + 6
    # several images: more than one per image made is refused before any is looked at
    body, kind = multipart(
        [("image[]", red_png(), f"{i}.png", "image/png") for i in range(11)] + [("prompt", b"blue circle", None, None)]
    )
    status, _, answer = post(battery, "/v1/images/edits", body, kind)
    assert status == 400 and "more than 10 images" in answer["error"]["message"]


def test_multipart_caps_and_charsets(battery):
    boundary = "b"
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    body = part * 60_000 + b"--b--\r\n"
    t0 = time.monotonic()
    status, _, answer = post(battery, "/v1/images/edits", body, f"multipart/form-data; boundary={boundary}")
    assert time.monotonic() - t0 < 2.0
    assert status == 400 and f"more than {MAX_PARTS} parts" in answer["error"]["message"]

    body, kind = multipart(
        [("image", red_png(), "r.png", "image/png"), ("prompt", b"blue circle", None, "text/plain; charset=x-klingon")]
    )
    status, _, answer = post(battery, "/v1/images/edits", body, kind)
    assert status == 400 and answer["error"]["param"] == "prompt" and "unknown charset 'x-klingon'" in str(answer)
    status, _, answer = post(battery, "/v1/images/edits", body.replace(b"x-klingon", b"rot13"), kind)
    assert status == 400 and "unknown charset 'rot13'" in answer["error"]["message"]
    body, kind = multipart([("image", red_png(), "r.png", "image/png"), ("prompt", b"blue circle", None, None)])
    status, _, answer = post(battery, "/v1/images/edits", body, kind + "; charset=nope")
    assert status == 400 and "unknown charset 'nope'" in answer["error"]["message"]
    # a field over its cap, a number too long, a body cut short
    body, kind = multipart([("image", red_png(), "r.png", "image/png"), ("prompt", b"x" * (300 << 10), None, None)])
    status, _, answer = post(battery, "/v1/images/edits", body, kind)
    assert status == 400 and answer["error"]["param"] == "prompt"
    body, kind = multipart(
        [
            ("image", red_png(), "r.png", "image/png"),
            ("prompt", b"blue circle", None, None),
            ("n", b"9" * 5000, None, None),
        ]
    )
    status, _, answer = post(battery, "/v1/images/edits", body, kind)
    assert status == 400 and answer["error"]["param"] == "n" and "5000 characters" in answer["error"]["message"]
    status, _, answer = post(battery, "/v1/images/edits", body[: len(body) // 2], kind)
    assert status == 400 and "closing boundary" in answer["error"]["message"]


def test_json_depth_and_number_limits(battery):
    before = health(battery)
    for body, words in (
        (b'{"prompt": "red circle", "seed": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"prompt": "red circle", "seed": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", "nested too deeply"),
        (b'{"prompt": "red circle", "seed": ' + b"7" * 5000 + b"}", "a number of 5000 characters"),
        (b'{"prompt": "red circle", "guidance": 1.' + b"5" * 5000 + b"}", "a number of 5002 characters"),
        (b'{"prompt": "red circle", "guidance": NaN}', "NaN is not a JSON number"),
    ):
        t0 = time.monotonic()
        status, _, answer = request(
            battery, "POST", "/v1/images/generations", body, {"Content-Type": "application/json"}
        )
        assert status == 400 and words in answer["error"]["message"], (body[:60], answer)
        assert time.monotonic() - t0 < 2.0
    assert health(battery)["started"] == before["started"]


def test_a_client_that_trickles_its_request_is_disconnected(pipe):
    s = Server(pipe, port=0, quiet=True, request_timeout=1.0).start()
    try:
        for head, trickle in (
            (b"POST /v1/images/generations HTTP/1.1\r\n", b"X-Slow: 1\r\n"),  # headers, a line at a time
            (
                b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n",
                b" ",
            ),  # a body, a byte at a time
        ):
            sock = raw_connection(s)
            sock.settimeout(0.25)
            t0, closed = time.monotonic(), False
            sock.sendall(head)
            while time.monotonic() - t0 < 8:
                try:
                    sock.sendall(trickle)
                    if sock.recv(65536) == b"":
                        closed = True
                        break
                except socket.timeout:
                    continue
                except OSError:  # reset
                    closed = True
                    break
            sock.close()
            assert closed and time.monotonic() - t0 < 3.5, time.monotonic() - t0
        assert health(s)["status"] == "ok"
    finally:
        s.close()


def test_clients_that_leave_before_their_answer_are_not_errors(battery):
    for _ in range(20):
        sock = raw_connection(battery)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close
        sock.close()
    for _ in range(3):
        sock = raw_connection(battery)
        data = json.dumps({"prompt": "red circle", "n": 4, **FAST}).encode()
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )
        sock.close()
    wait_for(battery, lambda h: h["running"] == 0 and h["queued"] == 0, 20)
    assert health(battery)["failed"] == 0


def test_without_a_key_only_unrebindable_names_are_answered(pipe):
    """A server bound elsewhere (simulated: the rule, on 127.0.0.1) without a key answers only
    requests addressed to an IP address or localhost; one on the loopback only loopback names."""
    s = Server(pipe, port=0, quiet=True).start()
    try:
        status, _, body = request(s, "GET", "/health", headers={"Host": "rebind.example:8080"})
        assert status == 403 and "loopback" in body["error"]["message"]
        s.loopback = False  # as bound to 0.0.0.0 with --insecure-no-auth
        for host, expected in (
            ("rebind.example:8080", 403),
            ("192.168.1.20:8080", 200),
            ("[fe80::1]:8080", 200),
            ("localhost:8080", 200),
        ):
            status, _, body = request(s, "GET", "/health", headers={"Host": host})
            assert status == expected, (host, body)
        # a rebinding page: its Origin and Host agree, and its name is refused
        status, _, body = request(
            s,
            "POST",
            "/v1/images/generations",
            {"prompt": "red circle"},
            {"Host": "rebind.example:8080", "Origin": "http://rebind.example:8080"},
        )
        assert status == 403 and "IP address" in body["error"]["message"]
        s.api_key = "sekret"  # with a key, the key protects
        assert request(s, "GET", "/health", headers={"Host": "mybox.example:8080"})[0] == 200
    finally:
        s.close()


def test_an_exposed_address_without_a_key_is_refused_before_binding(capsys, monkeypatch):
    def no(*a, **k):
        raise AssertionError("bound or loaded")

    monkeypatch.delenv("MLX_STARFLOW_API_KEY", raising=False)
    monkeypatch.setattr(server_module, "Server", no)
    monkeypatch.setattr(Pipeline, "from_pretrained", no)
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert server_module.main(["--model", "demo", "--host", host]) == 1
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--insecure-no-auth" in lines[0], out.err
        assert out.out == ""
    with pytest.raises(AssertionError, match="bound or loaded"):  # the flag says it is meant: it goes on to bind
        server_module.main(["--model", "demo", "--host", "0.0.0.0", "--insecure-no-auth"])


def test_sigterm_stops_a_running_request_and_leaves_no_folder(tmp_path):
    log = open(tmp_path / "server.log", "w+")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_starflow.server", "--model", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, (tmp_path / "server.log").read_text())
        fake = type("S", (), {"url": f"http://127.0.0.1:{m[1]}", "server_address": ("127.0.0.1", int(m[1]))})
        assert len(list(tmp.glob("mlx-starflow-server-*"))) == 1  # the images folder (MLX keeps its own cache here)
        data = json.dumps({"prompt": "red circle", **HANG}).encode()
        sock = raw_connection(fake)
        sock.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )
        wait_for(fake, lambda h: h["running"] == 1, 20)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        took = time.monotonic() - t0
        assert took < 8 and code == 0, (took, code, (tmp_path / "server.log").read_text()[-2000:])
        sock.close()
        assert list(tmp.glob("mlx-starflow-server-*")) == []
        err = (tmp_path / "server.log").read_text()
        assert "Traceback" not in err and "stopping" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


def test_after_the_battery_the_server_serves_correct_images_and_holds_no_more_memory(battery, pipe):
    r = client(battery).images.generate(prompt="green triangle", extra_body={"seed": 42, **FAST})
    served = np.array(png(r.data[0].b64_json))
    direct = np.array(pipe.generate("green triangle", seed=42, denoise="none").images[0])
    assert np.array_equal(served, direct)
    assert list(battery.files.folder.iterdir()) == []  # nothing was written for any of it
    wait_for(battery, lambda h: h["running"] == 0)
    assert vm_rss() - battery.rss_start < 300 << 20, (battery.rss_start, vm_rss())
    errors = [r for r in battery.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert health(battery)["failed"] == 0
