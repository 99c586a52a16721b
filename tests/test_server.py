"""The image server against the official `openai` client and raw HTTP, with the demo model.

Every server listens on 127.0.0.1 on a free port; every request has a timeout and
every wait a bound.
"""

import base64
import http.client
import io
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import default_sigint
from PIL import Image

openai = pytest.importorskip("openai", reason="the server tests use the official openai client (pip install openai)")

from mlx_starflow import Pipeline  # noqa: E402
from mlx_starflow.cli.server import Server, exposure_warning  # noqa: E402

FAST = {"denoise": "none"}  # our extension: skips the score step, a quarter of the demo's time


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("demo")


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(pipe, port=0, max_queue=4, quiet=True).start()
    yield s
    s.close()


def client(server, **kw):
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=kw.pop("api_key", "unused"),
        max_retries=0,
        timeout=kw.pop("timeout", 60),
        **kw,
    )


def request(server, method, path, body=None, headers=None, timeout=20):
    """(status, headers, parsed JSON or raw bytes)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        kind = r.getheader("Content-Type", "")
        return r.status, dict(r.getheaders()), json.loads(data) if kind.startswith("application/json") else data
    finally:
        conn.close()


def health(server) -> dict:
    status, _, body = request(server, "GET", "/health")
    assert status == 200
    return body


def wait_for(server, test, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h = health(server)
        if test(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"the server did not get there in {seconds} s: {health(server)}")


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def open_stream(server, body: dict) -> socket.socket:
    """A raw streaming request; the caller reads and closes the socket."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(server.server_address[:2], timeout=20)
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    return sock


# -- the official client ------------------------------------------------------------------


def test_openai_client_gets_pngs_and_a_seed_gives_the_same_bytes_streamed_or_not(server):
    c = client(server)
    r = c.images.generate(prompt="red circle", n=2, size="32x32", extra_body={"seed": 5})
    assert isinstance(r.created, int) and abs(r.created - time.time()) < 600
    assert len(r.data) == 2 and all(d.revised_prompt is None and d.url is None for d in r.data)
    images = [png(d.b64_json) for d in r.data]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    # each PNG carries what makes it again: image i has seed + i
    assert [json.loads(im.text["parameters"])["seed"] for im in images] == [5, 6]
    assert images[0].text["prompt"] == "red circle"
    assert images[0].tobytes() != images[1].tobytes()

    events = list(
        c.images.generate(prompt="red circle", n=2, size="32x32", stream=True, partial_images=1, extra_body={"seed": 5})
    )
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"] * 2
    for e in events[:2]:  # the preview after the deep block: a decodable image of the same size
        assert isinstance(e, openai.types.ImageGenPartialImageEvent) and e.partial_image_index == 0
        assert png(e.b64_json).size == (32, 32) and e.size == "32x32" and e.output_format == "png"
    done = [e for e in events if isinstance(e, openai.types.ImageGenCompletedEvent)]
    assert [e.b64_json for e in done] == [d.b64_json for d in r.data]  # the same seed: the same bytes


def test_url_responses_are_served_from_the_servers_folder(server):
    r = client(server).images.generate(prompt="blue square", response_format="url", extra_body={"seed": 3, **FAST})
    url = r.data[0].url
    assert r.data[0].b64_json is None and url.startswith(server.url + "/files/")
    status, headers, data = request(server, "GET", url[len(server.url) :])
    assert status == 200 and headers["Content-Type"] == "image/png"
    im = Image.open(io.BytesIO(data))
    assert im.size == (32, 32) and json.loads(im.text["parameters"])["seed"] == 3
    assert len(list(server.files.folder.glob("*.png"))) >= 1
    for path in ("/files/nothing.png", "/files/../server.py", "/files/%2e%2e%2fserver.py"):
        status, _, body = request(server, "GET", path)
        assert status == 404 and body["error"]["code"] == "not_found"


def test_models_health_and_the_page(server):
    c = client(server)
    models = c.models.list().data
    assert [m.id for m in models] == ["demo"]
    card = c.models.retrieve("demo")
    assert card.sizes == ["32x32"] and len(card.prompts) == 12 and "blue triangle" in card.prompts
    with pytest.raises(openai.NotFoundError, match="serves 'demo'"):
        c.models.retrieve("dall-e-3")
    h = health(server)
    assert h["status"] == "ok" and h["model"] == "demo" and h["max_queue"] == 4
    status, headers, page = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<script" in page and b"/v1/images/generations" in page
    assert not re.search(rb"""(src|href)=["']https?://""", page)  # self-contained: nothing from elsewhere


# -- bad requests ---------------------------------------------------------------------------

BAD = [  # (body, param the error names or None, words the message has)
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"n": 1}, "prompt", "required"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "red circle", "n": "2"}, "n", "must be an integer"),
    ({"prompt": "red circle", "n": 0}, "n", "from 1 to 10"),
    ({"prompt": "red circle", "n": 1000}, "n", "from 1 to 10"),
    ({"prompt": "red circle", "n": 1.5}, "n", "must be an integer"),
    ({"prompt": "red circle", "size": "64x64"}, "size", "this model makes 32x32"),
    ({"prompt": "red circle", "size": "large"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "red circle", "response_format": "xml"}, "response_format", "b64_json or url"),
    ({"prompt": "red circle", "output_format": "jpeg"}, "output_format", "png"),
    ({"prompt": "red circle", "stream": "yes"}, "stream", "must be a boolean"),
    ({"prompt": "red circle", "partial_images": 9}, "partial_images", "from 0 to 3"),
    ({"prompt": "red circle", "seed": "x"}, "seed", "integer"),
    ({"prompt": "red circle", "seed": -1}, "seed", "integer from 0"),
    ({"prompt": "red circle", "n": 2, "seed": [1, 2, 3]}, "seed", "3 seeds for 2 images"),
    ({"prompt": "red circle", "guidance": "high"}, "guidance", "must be a number"),
    ({"prompt": "red circle", "guidance": -1}, "guidance", "guidance must be >= 0 and finite"),
    ({"prompt": "red circle", "sampler": "euler"}, "sampler", "sampler must be one of jacobi, sequential"),
    ({"prompt": "red circle", "steps": 20}, "steps", "unknown parameter 'steps'"),
    ({"prompt": "purple hexagon"}, None, 'unknown prompt "purple hexagon"'),
]


def test_bad_requests_are_400s_that_never_reach_the_model(server):
    before = health(server)
    for body, param, words in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, answer = request(server, "POST", "/v1/images/generations", raw, {"Content-Type": "application/json"})
        assert status == 400, (body, answer)
        assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param, body
        assert words in answer["error"]["message"], (words, answer)
    after = health(server)
    assert after["started"] == before["started"] and after["accepted"] == before["accepted"]
    assert after["invalid"] == before["invalid"] + len(BAD) - 2  # the two unreadable bodies are not requests


def test_body_size_length_route_and_method_errors(server):
    big = json.dumps({"prompt": "red circle", "user": "x" * (1 << 20)}).encode()
    status, _, answer = request(server, "POST", "/v1/images/generations", big, {"Content-Type": "application/json"})
    assert status == 413 and "at most 1048576" in answer["error"]["message"]
    # a body without a length (chunked) is refused, not read
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        assert s.recv(100).startswith(b"HTTP/1.1 411")
    status, _, answer = request(server, "POST", "/v1/images/variations", {"prompt": "x"})
    assert status == 404 and "no route" in answer["error"]["message"]
    status, _, answer = request(server, "GET", "/v1/images/generations")
    assert status == 404
    assert health(server)["status"] == "ok"  # and the server goes on


def test_client_exception_types(server, pipe, monkeypatch):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="from 1 to 10"):
        c.images.generate(prompt="red circle", n=1000)
    with pytest.raises(openai.BadRequestError, match="this model makes 32x32"):
        c.images.generate(prompt="red circle", size="1024x1024")

    # an internal failure: a 500 (a stream: an error event), and the server goes on serving
    def broken(*a, **k):
        raise RuntimeError("the GPU caught fire")

    monkeypatch.setattr(pipe, "conditioning", broken)
    with pytest.raises(openai.InternalServerError, match="RuntimeError: the GPU caught fire"):
        c.images.generate(prompt="red circle")
    with pytest.raises(openai.APIError, match="the GPU caught fire"):
        list(c.images.generate(prompt="red circle", stream=True))
    monkeypatch.undo()
    assert health(server)["failed"] == 2
    r = c.images.generate(prompt="green triangle", extra_body={"seed": 1, **FAST})
    assert png(r.data[0].b64_json).size == (32, 32)


def test_api_key_host_and_origin(pipe):
    s = Server(pipe, port=0, api_key="sekret", quiet=True).start()
    try:
        status, _, body = request(s, "GET", "/v1/models")
        assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
        assert body["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client(s, api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            client(s, api_key="wrong").images.generate(prompt="red circle")
        assert client(s, api_key="sekret").models.list().data[0].id == "demo"
        assert request(s, "GET", "/health")[0] == 200  # the page and health need no key
        assert request(s, "GET", "/")[0] == 200
        # a loopback server answers only loopback names: no DNS rebinding
        status, _, body = request(s, "GET", "/health", headers={"Host": "evil.example:80"})
        assert status == 403 and "loopback" in body["error"]["message"]
        # a page of another origin cannot post (the key is not even looked at)
        status, _, body = request(
            s,
            "POST",
            "/v1/images/generations",
            {"prompt": "red circle"},
            {"Origin": "http://evil.example", "Authorization": "Bearer sekret"},
        )
        assert status == 403 and "cross-origin" in body["error"]["message"]
    finally:
        s.close()
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert "no authentication" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "sekret") is None


# -- queue and cancellation ---------------------------------------------------------------


def test_queue_order_429_and_a_waiting_client_that_leaves(pipe):
    s = Server(pipe, port=0, max_queue=1, quiet=True).start()
    try:
        c = client(s)
        start = health(s)
        first = {}
        a = threading.Thread(
            target=lambda: first.update(r=c.images.generate(prompt="red circle", n=3, extra_body={"seed": 10, **FAST}))
        )
        a.start()
        wait_for(s, lambda h: h["running"] == 1)
        waiting = open_stream(s, {"prompt": "blue circle", "seed": 20, **FAST})  # queued behind it
        wait_for(s, lambda h: h["queued"] == 1)
        with pytest.raises(openai.RateLimitError, match="busy") as e:  # running 1 + waiting 1: full
            c.images.generate(prompt="red square", extra_body=FAST)
        assert int(e.value.response.headers["Retry-After"]) >= 1
        waiting.close()  # the waiting client leaves: its request is dropped unrun
        wait_for(s, lambda h: h["cancelled"] == start["cancelled"] + 1 and h["queued"] == 0, 5)
        last = c.images.generate(prompt="yellow square", extra_body={"seed": 30, **FAST})  # room again
        a.join(timeout=60)
        assert len(first["r"].data) == 3 and png(last.data[0].b64_json).size == (32, 32)
        h = health(s)
        assert h["started"] - start["started"] == 2 and h["completed"] - start["completed"] == 2
        assert h["rejected"] - start["rejected"] == 1
    finally:
        s.close()


def test_a_client_that_leaves_mid_stream_cancels_at_the_next_token(server):
    start = health(server)
    sock = open_stream(server, {"prompt": "red triangle", "n": 4, "stream": True, "progress": True, "seed": 1})
    seen, deep = b"", None
    deadline = time.monotonic() + 30
    while deep is None and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        assert chunk, seen
        seen += chunk
        deep = re.search(rb'"stage": "deep", "done": (\d+), "total": (\d+)', seen)
    assert seen.startswith(b"HTTP/1.1 200") and b"text/event-stream" in seen and deep
    assert int(deep[1]) < int(deep[2])
    t0 = time.monotonic()
    sock.close()
    h = wait_for(server, lambda h: h["running"] == 0, 10)
    stopped = time.monotonic() - t0
    assert h["cancelled"] == start["cancelled"] + 1 and h["completed"] == start["completed"], h
    assert stopped < 2.0, f"{stopped:.2f} s to notice: not at the next token"
    r = client(server).images.generate(prompt="red triangle", extra_body={"seed": 1, **FAST})
    assert png(r.data[0].b64_json).size == (32, 32)  # and it goes on serving


# -- the command line under load ------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident memory of a process in bytes."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text())[1]) * 1024
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    return int(out.stdout.strip()) * 1024


def test_command_line_server_under_load(tmp_path):
    """8 clients x 4 requests at once against `python -m mlx_starflow.server --max-queue 2`:
    each request is answered once, with its own image or a 429; memory comes back."""
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_starflow.server", "--model", "demo", "--port", "0", "--max-queue", "2", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        line = proc.stdout.readline()  # printed once the model is loaded
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, (tmp_path / "server.log").read_text())
        url = f"http://127.0.0.1:{m[1]}"
        fake = type("S", (), {"url": url, "server_address": ("127.0.0.1", int(m[1]))})
        c = client(fake, timeout=120)
        c.images.generate(prompt="red circle", extra_body={"seed": 0, **FAST})  # warm: compiled steps, caches
        wait_for(fake, lambda h: h["running"] == 0)
        time.sleep(0.2)
        rss_before, start = rss(proc.pid), health(fake)

        peak, stop = [rss_before], threading.Event()

        def sample():
            while not stop.wait(0.05):
                peak.append(rss(proc.pid))

        outcomes, lock = {}, threading.Lock()

        def run(client_id):
            for j in range(4):
                seed = 1000 * client_id + j
                t0 = time.perf_counter()
                try:
                    r = c.images.generate(prompt="green circle", extra_body={"seed": seed, **FAST})
                    got = [json.loads(png(d.b64_json).text["parameters"])["seed"] for d in r.data]
                    outcome = ("ok", got, time.perf_counter() - t0)
                except openai.RateLimitError as e:
                    outcome = ("429", int(e.response.headers["Retry-After"]), time.perf_counter() - t0)
                with lock:
                    assert seed not in outcomes
                    outcomes[seed] = outcome

        watcher = threading.Thread(target=sample)
        watcher.start()
        t0 = time.perf_counter()
        clients = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=120)
        wall = time.perf_counter() - t0
        assert not any(t.is_alive() for t in clients)
        h = wait_for(fake, lambda h: h["running"] == 0 and h["queued"] == 0)
        time.sleep(0.3)
        rss_after = rss(proc.pid)
        stop.set()
        watcher.join()

        ok = {s: o for s, o in outcomes.items() if o[0] == "ok"}
        rejected = {s: o for s, o in outcomes.items() if o[0] == "429"}
        assert len(outcomes) == 32 and len(ok) + len(rejected) == 32  # none lost
        assert all(o[1] == [s] for s, o in ok.items())  # each its own image: none swapped or answered twice
        assert all(o[1] >= 1 for o in rejected.values())
        assert ok and rejected
        assert h["completed"] - start["completed"] == len(ok) and h["rejected"] - start["rejected"] == len(rejected)
        assert h["accepted"] - start["accepted"] == len(ok) and h["failed"] == h["cancelled"] == 0
        latency = sorted(o[2] for o in ok.values())
        print(
            f"\nload: 8 clients x 4 requests in {wall:.1f} s: {len(ok)} served, {len(rejected)} answered 429; "
            f"served latency median {statistics.median(latency):.2f} s, max {latency[-1]:.2f} s, "
            f"{len(ok) / wall:.2f} images/s; 429s in {max(o[2] for o in rejected.values()) * 1000:.0f} ms at most; "
            f"RSS {rss_before / 2**20:.0f} MB before, {max(peak) / 2**20:.0f} MB peak, "
            f"{rss_after / 2**20:.0f} MB after"
        )
        assert rss_after < rss_before + max(48 << 20, rss_before // 10), (rss_before, rss_after)

        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        log.close()


def test_command_line_refuses_bad_options_and_a_taken_port_before_loading(capsys, monkeypatch):
    from mlx_starflow.cli import server as server_module

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    for args, words in (
        (["--max-queue", "-1"], "--max-queue must be at least 0"),
        (["--port", "70000"], "--port must be 0..65535"),
        (["--max-images", "0"], "--max-images must be at least 1"),
    ):
        assert server_module.main(args) == 1
        assert words in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server_module.main(["--model", "demo", "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# -- edits ------------------------------------------------------------------------------------


def png_file(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_edits_with_the_openai_client_keep_what_the_mask_keeps(server):
    import numpy as np

    from mlx_starflow.demo.shapes import draw, prompt_to_class

    source = draw(prompt_to_class("red circle"), np.random.default_rng(0))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # white: the left half may change; black: the right half stays
    c = client(server)
    before = health(server)
    r = c.images.edit(
        image=("red.png", png_file(source), "image/png"),
        mask=("mask.png", png_file(mask), "image/png"),
        prompt="blue circle",
        extra_body={"source_prompt": "red circle", "strength": 1.0, "seed": 4, **FAST},
    )
    im = png(r.data[0].b64_json)
    params = json.loads(im.text["parameters"])
    assert im.size == (32, 32) and params["operation"] == "edit" and params["source_prompt"] == "red circle"
    assert params["prompt"] == "blue circle" and params["strength"] == 1.0 and params["seed"] == 4
    edited = np.asarray(im.convert("RGB"))
    assert (edited[:, 16:] == source[:, 16:]).all()  # kept bit for bit
    assert not (edited[:, :16] == source[:, :16]).all()  # fresh noise under the mask: changed

    for kwargs, param, words in (
        ({"image": ("x.png", b"not a picture", "image/png")}, "image", "not an image file"),
        (
            {"image": ("red.png", png_file(source), "image/png"), "extra_body": {"strength": 2}},
            "strength",
            "strength must be a number in [0, 1]",
        ),
        ({"image": ("red.png", png_file(source), "image/png"), "n": 0}, "n", "from 1 to 10"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.images.edit(prompt="blue circle", **kwargs)
        assert e.value.body["param"] == param and words in e.value.body["message"]
    status, _, body = request(server, "POST", "/v1/images/edits", {"prompt": "blue circle"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    after = health(server)
    assert after["started"] == before["started"] + 1 and after["completed"] == before["completed"] + 1
