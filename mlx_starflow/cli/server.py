"""python -m mlx_starflow.server: the OpenAI images API and a web page, on one resident model.

    python -m mlx_starflow.server --model demo          # then open http://127.0.0.1:8080/

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    image = client.images.generate(prompt="red circle", size="32x32", extra_body={"seed": 7})

Endpoints: POST /v1/images/generations (and /v1/images/edits), GET /v1/models,
GET /health, GET /files/<name> (images asked for with response_format "url"), and
GET / (the page).

The HTTP stack is the standard library's ThreadingHTTPServer, as mlx_lm.server's:
no new runtime dependency, and nothing here an event loop would improve. The model
runs one request at a time whatever serves the sockets, so the design is a thread
per connection that reads, checks and answers, and one worker thread that owns the
pipeline. Checked requests wait in a bounded queue in arrival order (a full one
answers 429 with Retry-After); a request that fails its checks is a 400 and never
reaches the queue. The worker iterates `Pipeline.generate_steps` and, after every
token, peeks at the client's socket: a client that went away (or a stream whose
write failed) stops the iteration, which is the pipeline's own cancellation.
Server-sent events are plain writes on the connection, closed after the stream.
When the queue runs empty the worker returns MLX's buffer cache, so an idle server
holds the model and no more.

Every unit of work is bounded: a request's headers and body have a deadline (a client
that trickles them is disconnected), JSON has depth and number limits, a multipart body
a cap on its parts, and uploaded images are checked from their headers (images.probe)
in the connection thread but decoded only by the worker, once the request is queued.
The worker hears of a client that left within one token or Jacobi iteration. The
threads talk in small event dataclasses (Progress ... Cancelled); diagnostics go to
the `mlx_starflow.server` logger (--quiet: warnings only). SIGINT and SIGTERM cancel
the running request, remove the images folder and end the process.

A server without a key answers only requests addressed to a name that cannot be
rebound: a loopback one only to a loopback name, one bound elsewhere (which takes
--insecure-no-auth) only to an IP address or localhost; and no server accepts a POST
from a page of another origin: a web page the user visits cannot drive it. With
--api-key every /v1 request needs it as a bearer token, compared in constant time.
Images asked for by URL are served without the key: their names are random (128
bits), the URL itself is the permission.
"""

import base64
import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import re
import secrets
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from email.parser import HeaderParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

import mlx.core as mx

from ..editing import check_strength, edit_steps
from ..images import MAX_IMAGE_PIXELS, atomic_write, engine_version, png_bytes, probe
from ..loading.hub import ModelNotFound
from ..options import GenerateOptions, specs
from ..pipeline import Pipeline
from .common import add_load_options, load_options, new_parser, say_precision

log = logging.getLogger("mlx_starflow.server")

MAX_IMAGES = 10  # OpenAI's bound for n
MAX_PARTIALS = 3  # OpenAI's bound for partial_images
MAX_PROMPT = 32000  # characters, OpenAI's bound
MAX_JSON = 1 << 20  # bytes of a JSON request
MAX_JSON_DEPTH = 8  # levels of nesting in a JSON request (ours need 2: a list of seeds)
MAX_NUMBER = 40  # characters of one JSON number (a 64-bit seed has 20 digits)
MAX_UPLOAD = 50 << 20  # bytes of a multipart request (an image and a mask)
MAX_PARTS = 64  # parts (fields and files) of a multipart request
MAX_FIELD = 256 << 10  # bytes of one multipart text field (a prompt of 32000 characters in UTF-8 fits)
MAX_PART_HEADERS = 8 << 10  # bytes of one multipart part's headers
REQUEST_TIMEOUT = 30.0  # seconds for a request's line and headers, from its first byte; and a body's base
BODY_RATE = 256 << 10  # bytes per second a body must at least arrive at, after REQUEST_TIMEOUT
STOP_TIMEOUT = 10.0  # seconds the worker has to stop at a signal
FILE_TTL = 3600  # seconds an image asked for by URL is kept
SEED_LIMIT = 2**64  # mx.random.key takes an unsigned 64-bit seed
POLL = 0.1  # seconds between the checks of a waiting request's client
KEEPALIVE = 15.0  # seconds between comments on a quiet stream
PROGRESS_EVERY = 0.05  # seconds between progress events of a stream
FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{22}\.png$")
LOOPBACK_NAMES = ("localhost", "localhost.")


class ApiError(Exception):
    """A request answered with an OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "invalid_request_error",
        404: "invalid_request_error",
        405: "invalid_request_error",
        411: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


# -- checking a request ---------------------------------------------------------------------

KINDS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}
# Every parameter a request may carry, with its JSON type. The OpenAI ones a flow has no use
# for are accepted and ignored (ignored below); ours are seed ... progress.
# The OpenAI parameters with their JSON types; those a flow has no use for are accepted and
# ignored (IGNORED).
OPENAI = {
    "prompt": "string",
    "n": "integer",
    "size": "string",
    "response_format": "string",
    "stream": "boolean",
    "partial_images": "integer",
    "output_format": "string",
    "background": "string",
    "model": "string",
    "quality": "string",
    "style": "string",
    "moderation": "string",
    "user": "string",
    "safety_identifier": "string",
    "output_compression": "integer",
    "input_fidelity": "string",
}
IGNORED = (
    "model",
    "quality",
    "style",
    "moderation",
    "user",
    "safety_identifier",
    "output_compression",
    "input_fidelity",
)
JSON_KINDS = {str: "string", int: "integer", float: "number", bool: "boolean"}
# Ours: every GenerateOptions field that is a request parameter, passed to the pipeline under
# its own name (prompt, n and seed are read apart), and our stream's progress events.
OPTIONS = tuple(name for name, _, m in specs(GenerateOptions) if m["request"] is True and name not in ("seed",))
PARAMS = {
    **OPENAI,
    "seed": "integer",
    **{name: JSON_KINDS[m["kind"]] for name, _, m in specs(GenerateOptions) if name in OPTIONS},
    "progress": "boolean",
}
EDIT_PARAMS = {"source_prompt": "string", "strength": "number"}


def _number(kind: type):
    def parse(text: str):
        if len(text) > MAX_NUMBER:
            raise ApiError(400, f"a number of {len(text)} characters in the request; at most {MAX_NUMBER}")
        return kind(text)

    return parse


def _constant(name: str):
    raise ApiError(400, f"{name} is not a JSON number")


def _depth(value) -> int:
    """The nesting depth of a parsed JSON value, stopping past MAX_JSON_DEPTH (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_JSON_DEPTH:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((item, d + 1) for item in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text):
    """JSON text -> its value, within the limits (depth, number length), else a 400."""
    try:
        value = json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_constant)
    except RecursionError:
        value = None
        deep = True
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    else:
        deep = _depth(value) > MAX_JSON_DEPTH
    if deep:
        raise ApiError(400, f"the request is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects")
    return value


def _typed(body: dict, name: str, kind: str):
    """body[name] if it has the JSON type `kind` (None when absent or null), else a 400 naming it."""
    v = body.get(name)
    if v is None:
        return None
    if kind == "integer" and isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON has one number type: 2.0 is 2
    if not KINDS[kind](v):
        shown = json.dumps(v)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ApiError(400, f"'{name}' must be {'an' if kind[0] in 'ai' else 'a'} {kind}, not {shown}", name)
    return v


def _seed(value, n: int):
    """The seed extension: one integer (image i gets seed + i) or a list of n."""
    seeds = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) not in (1, n):
        raise ApiError(400, f"'seed' has {len(value)} seeds for {n} images: give one seed, or one per image", "seed")
    for s in seeds:
        s = int(s) if isinstance(s, float) and s.is_integer() else s
        if not KINDS["integer"](s) or not 0 <= s < SEED_LIMIT - n:
            raise ApiError(
                400,
                f"'seed' must be an integer from 0 to {SEED_LIMIT - n - 1} (or a list of them), not {json.dumps(s)}",
                "seed",
            )
    return [int(s) for s in seeds] if isinstance(value, list) else int(value)


def limits(max_images: int) -> dict:
    """Every request parameter's limits, as the checks apply them: from the options' own
    metadata (options.specs), n within this server's --max-images."""
    out = {}
    for name, _, m in specs(GenerateOptions):
        if m["request"] is None or m["request"] is False:
            continue
        entry = {k: v for k, v in (("min", m["low"]), ("max", m["high"]), ("choices", m["choices"])) if v is not None}
        if "choices" in entry:
            entry["choices"] = list(entry["choices"])
        if entry:
            out[name if m["request"] is True else m["request"]] = entry
    out["n"] = {"min": 1, "max": min(out.get("n", {}).get("max", max_images), max_images)}
    out["prompt"] = {"max_length": MAX_PROMPT}
    out["partial_images"] = {"min": 0, "max": MAX_PARTIALS}
    out["strength"] = {"min": 0.0, "max": 1.0}
    out["image"] = {"max_files": max_images, "max_pixels": MAX_IMAGE_PIXELS}
    out["body"] = {"max_bytes": MAX_JSON, "max_bytes_edit": MAX_UPLOAD, "max_parts": MAX_PARTS}
    return out


def model_sizes(pipe) -> list:
    """The sizes ("WxH") this model offers: its own square size, and for models trained on
    several aspect ratios a few others of about the same area."""
    cfg, s = pipe.config, pipe.image_size()
    sizes = [f"{s}x{s}"]
    if cfg.mix_aspect and cfg.rope:
        m = cfg.pixels_per_latent * cfg.patch_size
        for a, b in ((4, 3), (3, 4), (16, 9), (9, 16)):
            w, h = (round(s * math.sqrt(a / b) / m) * m, round(s * math.sqrt(b / a) / m) * m)
            sizes.append(f"{w}x{h}")
    return list(dict.fromkeys(sizes))


def parse_size(pipe, size) -> tuple:
    """ "WxH" (or "auto" / absent: the model's size) -> (width, height) this model can make, else a 400."""
    default = pipe.image_size()
    if size is None or size == "auto":
        return default, default
    sizes = model_sizes(pipe)
    cfg = pipe.config
    can = f"this model makes {', '.join(sizes)}"
    if cfg.mix_aspect and cfg.rope:
        can += f" (and any WxH whose sides are multiples of {cfg.pixels_per_latent * cfg.patch_size})"
    match = re.fullmatch(r"\s*(\d{1,5})\s*x\s*(\d{1,5})\s*", size)
    if not match:
        raise ApiError(400, f"'size' must be WIDTHxHEIGHT or auto, not {size!r}: {can}", "size")
    w, h = int(match[1]), int(match[2])
    try:
        if w < 1 or h < 1:
            raise ValueError
        pipe.latent_shape(h, w)
    except ValueError:
        raise ApiError(400, f"size {w}x{h} is not available: {can}", "size") from None
    return w, h


class Output:
    """How a request wants its answer: format, streaming, previews, progress events."""

    def __init__(self, body: dict, size: str):
        fmt = _typed(body, "response_format", "string") or "b64_json"
        if fmt not in ("b64_json", "url"):
            raise ApiError(400, f"'response_format' must be b64_json or url, not {fmt!r}", "response_format")
        out = _typed(body, "output_format", "string") or "png"
        if out != "png":
            raise ApiError(
                400,
                f"'output_format' must be png (this server writes PNGs with their parameters), not {out!r}",
                "output_format",
            )
        background = _typed(body, "background", "string") or "auto"
        if background not in ("auto", "opaque"):
            raise ApiError(
                400,
                f"'background' must be auto or opaque (the model makes opaque images), not {background!r}",
                "background",
            )
        self.format, self.size = fmt, size
        self.stream = bool(_typed(body, "stream", "boolean"))
        partials = _typed(body, "partial_images", "integer")
        partials = 1 if partials is None else partials
        if not 0 <= partials <= MAX_PARTIALS:
            raise ApiError(400, f"'partial_images' must be from 0 to {MAX_PARTIALS}, not {partials}", "partial_images")
        self.partials = partials if self.stream else 0
        self.progress = bool(_typed(body, "progress", "boolean")) and self.stream


def parse_request(pipe, body: dict, max_images: int, extra: Optional[dict] = None):
    """A request's JSON object (or form fields) -> (pipeline options, Output), or a 400 naming
    the parameter at fault. Nothing here touches the model."""
    known = {**PARAMS, **(extra or {})}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'; this server takes: {', '.join(known)}", unknown[0])
    for name in IGNORED:
        _typed(body, name, known[name])
    prompt = _typed(body, "prompt", "string")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    if len(prompt) > MAX_PROMPT:
        raise ApiError(400, f"'prompt' is {len(prompt)} characters; at most {MAX_PROMPT}", "prompt")
    n = _typed(body, "n", "integer")
    n = 1 if n is None else n
    if not 1 <= n <= max_images:
        raise ApiError(400, f"'n' must be from 1 to {max_images}, not {n}", "n")
    width, height = parse_size(pipe, _typed(body, "size", "string"))
    output = Output(body, f"{width}x{height}")
    options = {name: _typed(body, name, known[name]) for name in OPTIONS}
    options = {k: v for k, v in options.items() if v is not None}
    if body.get("seed") is not None:
        options["seed"] = _seed(body["seed"], n)
    extras = {name: _typed(body, name, kind) for name, kind in (extra or {}).items()}
    try:
        opts = pipe.resolve_options(GenerateOptions(prompt, num_images=n, height=height, width=width, **options))
    except ValueError as e:  # an OptionError names the option: the request's parameter
        option = getattr(e, "option", None)
        raise ApiError(400, str(e), {"num_images": "n", "prompts": "prompt"}.get(option, option)) from None
    return opts, output, {k: v for k, v in extras.items() if v is not None}


# -- the worker ------------------------------------------------------------------------------


@dataclass
class Progress:
    stage: str
    done: int
    total: int


@dataclass
class Partial:
    """A preview: `images` (PIL) of every image of the request, the `index`-th preview."""

    index: int
    images: list


@dataclass
class Done:
    result: object  # options.Result


@dataclass
class Failed:
    error: Exception


@dataclass
class Invalid:
    """A check made on the worker (an edit's images): a 400."""

    message: str
    param: Optional[str] = None


@dataclass
class Cancelled:
    pass


FINAL = (Done, Failed, Invalid, Cancelled)


class Job:
    """One accepted request: `start()` (called on the worker) gives the pipeline's events;
    the worker reports on `events`: Progress and Partial, then one of FINAL."""

    def __init__(self, start: Callable, output: Output, connection: Optional[socket.socket] = None):
        self.start, self.output = start, output
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self._poll, self._peeking = None, threading.Lock()  # the handler and the worker both look
        if connection is not None:
            self._poll = select.poll()
            self._poll.register(connection, select.POLLIN | select.POLLERR | select.POLLHUP)
            self._connection = connection

    def client_gone(self) -> bool:
        """The request was cancelled, or its client closed the connection: readable with
        nothing to read (or an error). A peek: nothing is consumed, and no wait."""
        if self.cancelled.is_set():
            return True
        if self._poll is None or not self._peeking.acquire(blocking=False):  # the other thread is looking
            return False
        try:
            gone = bool(self._poll.poll(0)) and self._connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            gone = True
        finally:
            self._peeking.release()
        if gone:
            self.cancelled.set()
        return gone


def _param_of(e: ValueError) -> Optional[str]:
    """The request parameter a worker-side check names: an OptionError's option, or the
    uploaded file its message is about."""
    option = getattr(e, "option", None)
    if option:
        return {"num_images": "n", "prompts": "prompt"}.get(option, option)
    named = re.search(r"\b(mask|image)\b", str(e))
    return named[1] if named else None


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class Worker:
    """The one thread that runs the pipeline: accepted jobs in arrival order, at most
    max_queue waiting behind the one running."""

    def __init__(self, pipe, max_queue: int):
        self.pipe, self.max_queue = pipe, max_queue
        self.stats = Counter()
        self.running: Optional[Job] = None
        self._waiting = deque()
        self._cond = threading.Condition()
        self._seconds = None  # a running mean of the seconds per job, for Retry-After
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlx-starflow-worker", daemon=True)
        self._thread.start()

    def count(self, name: str):
        with self._cond:
            self.stats[name] += 1

    def state(self) -> dict:
        with self._cond:
            return {
                "running": int(self.running is not None),
                "queued": len(self._waiting),
                "max_queue": self.max_queue,
                **{
                    k: self.stats[k]
                    for k in ("accepted", "rejected", "invalid", "started", "completed", "cancelled", "failed")
                },
            }

    def submit(self, job: Job):
        with self._cond:
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(max(1, math.ceil((self._seconds or 1.0) * (len(self._waiting) + 1))))
            self.stats["accepted"] += 1
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job):
        """Stop a job: dropped if still waiting, stopped at its next token if running."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats["cancelled"] += 1

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Cancel the running job (it stops at its next token or Jacobi iteration) and the
        waiting ones; True once the worker has ended."""
        with self._cond:
            self._stop = True
            for job in self._waiting:
                job.cancelled.set()
            if self.running is not None:
                self.running.cancelled.set()
            self._cond.notify()
        self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self.running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                    idle = not self._waiting
                if idle:  # between bursts the server holds the model, not the last activations
                    mx.clear_cache()

    def _run(self, job: Job):
        if job.client_gone():
            self.count("cancelled")
            return
        t0 = time.perf_counter()
        out = job.output
        steps = None
        try:
            try:
                steps = job.start()
            except ValueError as e:  # a check made here, where MLX runs (an edit's images): still a 400
                self.count("invalid")
                job.events.put(Invalid(str(e), _param_of(e)))
                return
            self.count("started")
            result, stage, last, shown = None, None, 0.0, 0
            for event in steps:
                if job.client_gone():
                    self.count("cancelled")
                    job.events.put(Cancelled())
                    return
                if event.result is not None:
                    result = event.result
                    continue
                now = time.perf_counter()
                if out.progress and (event.stage != stage or event.done == event.total or now - last > PROGRESS_EVERY):
                    stage, last = event.stage, now
                    job.events.put(Progress(event.stage, event.done, event.total))
                # partial_images previews, evenly through the deep block; the last one is the deep block's end
                if (
                    out.partials
                    and event.stage == "deep"
                    and event.step is not None
                    and event.done >= math.ceil(event.total * (shown + 1) / out.partials)
                ):
                    job.events.put(Partial(shown, self.pipe.decode(event.step.preview())))
                    shown += 1
        except Exception as e:
            self.count("failed")
            log.error("request failed: %s: %s", type(e).__name__, e, exc_info=True)
            job.events.put(Failed(e))
            return
        finally:
            if steps is not None:
                steps.close()
        seconds = time.perf_counter() - t0
        with self._cond:
            self._seconds = seconds if self._seconds is None else 0.7 * self._seconds + 0.3 * seconds
            self.stats["completed"] += 1
        job.events.put(Done(result))


# -- images out --------------------------------------------------------------------------------


def result_pngs(result) -> list:
    """The result's images as PNG bytes carrying their parameters (as generate writes them)."""
    version = engine_version()
    out = []
    for i, image in enumerate(result.images):
        params = {"prompt": result.prompts[i], **result.params, "engine": version}
        if result.seeds:
            params["seed"] = result.seeds[i]
        out.append(png_bytes(image, params))
    return out


class Files:
    """The folder of images asked for by URL: random names, kept FILE_TTL seconds."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="mlx-starflow-server-"))
        self._lock = threading.Lock()

    def add(self, data: bytes) -> str:
        name = secrets.token_urlsafe(16) + ".png"
        with self._lock:
            now = time.time()
            for old in self.folder.glob("*.png"):
                try:
                    if now - old.stat().st_mtime > FILE_TTL:
                        old.unlink()
                except FileNotFoundError:
                    pass
            atomic_write(self.folder / name, lambda tmp: Path(tmp).write_bytes(data))
        return name

    def get(self, name: str) -> Optional[bytes]:
        if not FILE_NAME.match(name):
            return None
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


# -- HTTP --------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    try:
        return urlsplit("//" + netloc).hostname or ""
    except ValueError:
        return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for API clients; streams close their connection
    server_version = "mlx-starflow"
    timeout = 60  # seconds a connection may idle or stall

    # -- plumbing

    def log_message(self, format, *args):
        if not self.server.quiet:
            log.info("%s %s", self.address_string(), format % args)

    def handle_one_request(self):
        """One request, its line and headers within the server's deadline from their first
        byte (a client that trickles them is disconnected); an idle connection waits up to
        `timeout` for it."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:
            self.close_connection = True
            return
        self._expired = False
        self.server.watch(self, self.server.request_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self)

    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj, headers: Optional[dict] = None):
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, e: ApiError):
        self._json(e.status, e.body(), e.headers)

    def _check_host(self):
        """A request must be addressed to a name no page can rebind: a page whose own name
        resolves to this machine (DNS rebinding) is refused. On the loopback that is a
        loopback name; bound elsewhere without a key, an IP address or localhost (with a
        key, the key is the protection)."""
        host = self.headers.get("Host")
        if host is None:
            return
        name = _host_name(host)
        if self.server.loopback and not _is_loopback(name):
            raise ApiError(
                403, "this server listens on the loopback only and answers requests addressed to localhost or 127.0.0.1"
            )
        if not self.server.loopback and self.server.api_key is None and not (_is_loopback(name) or _is_ip(name)):
            raise ApiError(
                403,
                "this server has no API key and answers only requests addressed to an IP address or localhost "
                "(no DNS rebinding): use its address, or start it with --api-key",
            )

    def _check_origin(self):
        """A browser names the page that sends a POST; only the server's own page may."""
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            raise ApiError(403, f"cross-origin request refused (from {origin}): use the page this server serves")

    def _check_key(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                401,
                "a valid API key is required: send it as 'Authorization: Bearer <key>'"
                if not token
                else "incorrect API key",
                code="invalid_api_key",
            )

    def _read_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity") or length is None:
            self.close_connection = True
            raise ApiError(411, "send the request body with a Content-Length (chunked bodies are not read)")
        try:
            length = int(length)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if length > limit:
            self.close_connection = True
            self._drain = length
            raise ApiError(413, f"the request body is {length} bytes; at most {limit} are read here")
        self.server.watch(self, self.server.request_timeout + length / BODY_RATE)
        try:
            body = self.rfile.read(length)
        except OSError:  # a client that stalls mid-body (the connection's timeout)
            body = b""
        finally:
            self.server.unwatch(self)
        if len(body) < length or self._expired:
            self.close_connection = True
            raise ApiError(400, "the request body ended before its Content-Length")
        return body

    def _discard_body(self):
        """After a 413: read what the client still sends (bounded), so it reads our answer
        rather than a reset connection."""
        left, deadline = min(getattr(self, "_drain", 0), 64 << 20), time.monotonic() + 5
        try:
            self.connection.settimeout(1)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16)) if hasattr(self.rfile, "read1") else b""
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _dispatch(self, routes: dict):
        self._drain = 0
        self.server.unwatch(self)  # the headers are in: answering has no deadline
        if self._expired:  # too slow: the connection was shut down, its headers may be cut short
            self.close_connection = True
            return
        path = urlsplit(self.path).path
        try:
            self._check_host()
            route = routes.get(path)
            if route is None:
                for prefix, r in routes.items():
                    if len(prefix) > 1 and prefix.endswith("/") and path.startswith(prefix) and path != prefix:
                        route = r
                        break
            if route is None:
                raise ApiError(404, f"no route {self.command} {path}", code="not_found")
            route(path)
        except ApiError as e:
            try:
                self._error(e)
            except OSError:  # the client left before its answer
                self.close_connection = True
                return
            if e.status == 413:
                self._discard_body()
        except OSError as e:  # the client left (a broken pipe, a reset, a timeout): nothing to answer
            log.debug("connection lost: %s", e)
            self.close_connection = True
        except Exception as e:  # a bug of ours: a 500, and the server goes on
            log.error("internal error on %s %s", self.command, path, exc_info=True)
            try:
                self._error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            except OSError:
                self.close_connection = True

    def do_GET(self):
        self._dispatch(
            {
                "/": self._page,
                "/index.html": self._page,
                "/health": self._health,
                "/v1/models": self._models,
                "/v1/models/": self._model,
                "/files/": self._file,
            }
        )

    def do_POST(self):
        self._dispatch({"/v1/images/generations": self._generations, "/v1/images/edits": self._edits})

    # -- GET

    def _page(self, path):
        self._send(
            200,
            self.server.page,
            "text/html; charset=utf-8",
            {
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    def _health(self, path):
        self._json(200, {"status": "ok", "model": self.server.model_id, **self.server.worker.state()})

    def _model_card(self) -> dict:
        pipe = self.server.pipe
        # the defaults a request gets (the model's own), for a prompt this model takes
        opts = pipe.resolve_options(GenerateOptions(pipe.classes.labels[0] if pipe.classes is not None else "a"))
        return {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-starflow",
            # ours: what the page offers
            "sizes": model_sizes(pipe),
            "prompts": pipe.classes.labels if pipe.classes is not None else None,
            "guidance": opts.guidance,
            "sampler": opts.sampler,
            "max_images": self.server.max_images,
            "limits": limits(self.server.max_images),  # every parameter's range, as the checks apply it
        }

    def _models(self, path):
        self._check_key()
        self._json(200, {"object": "list", "data": [self._model_card()]})

    def _model(self, path):
        self._check_key()
        name = path[len("/v1/models/") :]
        if name != self.server.model_id:
            raise ApiError(
                404,
                f"model '{name}' is not served here; this server serves '{self.server.model_id}'",
                code="model_not_found",
            )
        self._json(200, self._model_card())

    def _file(self, path):
        data = self.server.files.get(path[len("/files/") :])
        if data is None:
            raise ApiError(404, "no such image (images asked for by URL are kept for an hour)", code="not_found")
        self._send(200, data, "image/png", {"Cache-Control": "private, max-age=3600"})

    # -- POST

    def _json_body(self) -> dict:
        body = self._read_body(MAX_JSON)
        self._check_origin()
        self._check_key()
        obj = parse_json(body)
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return obj

    def _generations(self, path):
        body = self._json_body()
        pipe = self.server.pipe
        try:
            opts, output, _ = parse_request(pipe, body, self.server.max_images)
        except ApiError:
            self.server.worker.count("invalid")
            raise
        self._run(Job(lambda: pipe.generate_steps(opts), output, self.connection))

    def _edits(self, path):
        body = self._read_body(MAX_UPLOAD)
        self._check_origin()
        self._check_key()
        try:
            form = parse_multipart(self.headers.get("Content-Type", ""), body, self.server.max_images)
            del body  # the parts hold their own bytes
            opts, output, extra = parse_request(self.server.pipe, form.fields, self.server.max_images, EDIT_PARAMS)
            if "strength" in extra:
                try:
                    check_strength(extra["strength"])
                except ValueError as e:
                    raise ApiError(400, str(e), "strength") from None
        except ApiError:
            self.server.worker.count("invalid")
            raise
        pipe = self.server.pipe

        def start():  # on the worker: the images are decoded here, once, after the request was queued
            return edit_steps(
                pipe,
                form.images if len(form.images) > 1 else form.images[0],
                opts.prompts,
                mask=form.mask,
                num_images=opts.num_images,
                seed=opts.seed,
                guidance=opts.guidance,
                negative_prompt=opts.negative_prompt,
                sampler=opts.sampler,
                denoise=opts.denoise,
                jacobi_block_size=opts.jacobi_block_size,
                jacobi_threshold=opts.jacobi_threshold,
                jacobi_max_iter=opts.jacobi_max_iter,
                height=opts.height,
                width=opts.width,
                notes=self._note,
                **extra,
            )

        self._run(Job(start, output, self.connection))

    def _note(self, note: str):  # what an edit adjusted (a resized mask): the server's log
        log.info("note: %s", note)

    # -- running a job and answering

    def _run(self, job: Job):
        worker = self.server.worker
        try:
            worker.submit(job)
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy: {worker.max_queue} requests are already waiting; try again in {e.retry_after} s",
                code="queue_full",
                headers={"Retry-After": e.retry_after},
            ) from None
        try:
            if job.output.stream:
                self._stream(job)
            else:
                self._answer(job)
        finally:
            if job.cancelled.is_set():  # its client left: drop it if it is still waiting
                worker.cancel(job)

    def _events(self, job: Job, wait: float = POLL):
        """The worker's reports, until the last one; None when `wait` passes with none
        (then the client is checked: one that left cancels its request)."""
        while True:
            try:
                item = job.events.get(timeout=wait)
            except queue.Empty:
                if job.client_gone():
                    self.server.worker.cancel(job)
                    self.close_connection = True
                    return
                yield None
                continue
            yield item
            if isinstance(item, FINAL):
                return

    def _final(self, item) -> Optional[list]:
        """A last report -> the images as PNG bytes, or the ApiError to answer."""
        if isinstance(item, Invalid):
            raise ApiError(400, item.message, item.param)
        if isinstance(item, Failed):
            e = item.error
            raise ApiError(500, f"the generation failed: {type(e).__name__}: {e}")
        return result_pngs(item.result)

    def _items(self, job: Job, pngs: list, result) -> list:
        data = []
        for i, png in enumerate(pngs):
            item = (
                {"url": self._url(self.server.files.add(png))}
                if job.output.format == "url"
                else {"b64_json": base64.b64encode(png).decode()}
            )
            if result.seeds:
                item["seed"] = result.seeds[i]  # ours: the seed that makes this image again
            data.append(item)
        return data

    def _url(self, name: str) -> str:
        host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
        return f"http://{host}/files/{name}"

    def _answer(self, job: Job):
        for item in self._events(job):
            if item is None or isinstance(item, (Progress, Partial)):
                continue
            if isinstance(item, Cancelled):
                self.close_connection = True
                return
            pngs = self._final(item)
            result = item.result
            self._json(
                200,
                {
                    "created": int(time.time()),
                    "data": self._items(job, pngs, result),
                    "size": job.output.size,
                    "output_format": "png",
                },
            )

    def _sse(self, kind: str, obj: dict):
        self.wfile.write(f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode())

    def _stream(self, job: Job):
        """Server-sent events shaped as OpenAI's image streams: image_generation.partial_image
        (a preview) and image_generation.completed per image; with "progress": true also
        our progress events; a failure is an "error" event (the OpenAI client raises it)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        out = job.output
        common = {"size": out.size, "quality": "auto", "background": "opaque", "output_format": "png"}
        quiet = 0.0
        try:
            if out.progress:
                self._sse("progress", {"type": "progress", "stage": "queued", "done": 0, "total": 1})
            for item in self._events(job):
                if item is None:
                    quiet += POLL
                    if quiet >= KEEPALIVE:  # a comment: keeps proxies open, and finds a client that left
                        self.wfile.write(b": keep-alive\n\n")
                        quiet = 0.0
                    continue
                quiet = 0.0
                if isinstance(item, Progress):
                    self._sse(
                        "progress", {"type": "progress", "stage": item.stage, "done": item.done, "total": item.total}
                    )
                elif isinstance(item, Partial):
                    for i, image in enumerate(item.images):
                        self._sse(
                            "image_generation.partial_image",
                            {
                                "type": "image_generation.partial_image",
                                "created_at": int(time.time()),
                                "partial_image_index": item.index,
                                "image_index": i,
                                "b64_json": base64.b64encode(png_bytes(image)).decode(),
                                **common,
                            },
                        )
                elif isinstance(item, Cancelled):
                    return
                else:
                    try:
                        pngs = self._final(item)
                    except ApiError as e:
                        self._sse("error", e.body())
                        return
                    for i, data in enumerate(self._items(job, pngs, item.result)):
                        self._sse(
                            "image_generation.completed",
                            {
                                "type": "image_generation.completed",
                                "created_at": int(time.time()),
                                "image_index": i,
                                **data,
                                **common,
                            },
                        )
        except OSError:  # the client left mid-stream: its request stops at the next token
            self.server.worker.cancel(job)
            self.close_connection = True


# -- multipart (edits) -------------------------------------------------------------------------


@dataclass
class Form:
    """An edit's multipart body: its text fields read as values, the image files as bytes
    (checked from their headers, not decoded), the mask's bytes or None."""

    fields: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    mask: Optional[bytes] = None


def _headers(text: str):
    return HeaderParser(policy=HTTP).parsestr(text)


def _charset(name: Optional[str], param: Optional[str]) -> str:
    """A charset the standard library decodes text with, else a 400 naming it."""
    name = name or "utf-8"
    try:
        b"a".decode(name, errors="replace")  # unknown names and codecs that are not text encodings fail
    except (LookupError, ValueError):  # (UnicodeError is a ValueError)
        raise ApiError(400, f"unknown charset {name!r}: send the form's text as UTF-8", param) from None
    return name


def _parts(body: bytes, boundary: bytes):
    """The (headers, content) of each part, at most MAX_PARTS, split on the delimiter lines."""
    delim = b"--" + boundary
    if body.count(delim) > MAX_PARTS + 1:  # counted before anything is parsed
        raise ApiError(400, f"the multipart body has more than {MAX_PARTS} parts; an edit needs a few")
    pos = body.find(delim)
    if pos < 0:
        raise ApiError(400, "the multipart body could not be read (a missing or wrong boundary?)")
    pos += len(delim)
    while not body.startswith(b"--", pos):  # "--boundary--" closes the body
        eol = body.find(b"\r\n", pos)
        end = body.find(b"\r\n\r\n", eol) if eol >= 0 else -1
        if end < 0 or end - eol > MAX_PART_HEADERS:
            raise ApiError(400, "a part of the multipart body has no end to its headers, or too long ones")
        nxt = body.find(b"\r\n" + delim, end + 4)
        if nxt < 0:
            raise ApiError(400, "the multipart body ends without its closing boundary")
        yield body[eol + 2 : end], body[end + 4 : nxt]
        pos = nxt + 2 + len(delim)


def parse_multipart(content_type: str, body: bytes, max_images: int = MAX_IMAGES) -> Form:
    """A multipart/form-data body -> Form, within the caps: MAX_PARTS parts, MAX_FIELD bytes
    of text per field, max_images images and one mask, each image's pixel count checked
    from its header (images.probe). Fields named image or image[] are the images; n and
    the numbers come as text and are read as JSON values."""
    head = _headers(f"Content-Type: {content_type}\r\n\r\n")
    if head.get_content_type() != "multipart/form-data":
        raise ApiError(400, "an edit is sent as multipart/form-data (the image as a file field 'image')")
    boundary = head.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise ApiError(400, "the multipart body could not be read (a missing or wrong boundary?)")
    default_charset = _charset(head.get_param("charset"), None)
    form, kinds = Form(), {**PARAMS, **EDIT_PARAMS}
    for headers, payload in _parts(body, boundary.encode("latin-1")):
        part = _headers(headers.decode("utf-8", errors="replace"))
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        if part.get("Content-Transfer-Encoding", "binary").strip().lower() not in ("binary", "8bit", "7bit"):
            raise ApiError(400, f"'{name}' has a Content-Transfer-Encoding; form data is sent as it is", name)
        if name in ("image", "image[]", "mask"):
            field_name = name.rstrip("[]")
            if name == "mask" and form.mask is not None:
                raise ApiError(400, "give one 'mask'", "mask")
            if name != "mask" and len(form.images) >= max_images:
                raise ApiError(400, f"more than {max_images} images: at most one per image made", "image")
            label = "mask" if name == "mask" else f"image {len(form.images) + 1}"
            try:
                probe(payload, label, "a PNG, JPEG, WebP or other still image").close()
            except ValueError as e:
                raise ApiError(400, str(e), field_name) from None
            if name == "mask":
                form.mask = payload
            else:
                form.images.append(payload)
            continue
        if len(payload) > MAX_FIELD:
            raise ApiError(400, f"'{name}' is {len(payload)} bytes; a field has at most {MAX_FIELD}", name)
        text = payload.decode(_charset(part.get_content_charset() or default_charset, name), errors="replace")
        kind = kinds.get(name)
        if kind in ("integer", "number", "boolean"):
            try:
                form.fields[name] = parse_json(text.strip().lower() if kind == "boolean" else text)
            except ApiError as e:
                if "not valid JSON" not in e.message:
                    raise ApiError(400, f"'{name}': {e.message}", name) from None
                form.fields[name] = text  # the type check names it
        else:
            form.fields[name] = text
    if not form.images:
        raise ApiError(400, "'image' is required: the picture to edit, as a file field", "image")
    return form


# -- the server --------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        pipe=None,
        host: str = "127.0.0.1",
        port: int = 8080,
        max_queue: int = 16,
        api_key: Optional[str] = None,
        max_images: int = MAX_IMAGES,
        quiet: bool = False,
        request_timeout: float = REQUEST_TIMEOUT,
    ):
        """Binds at once; serves `pipe` (or the one given later to `use`, so a command
        line finds a taken port before it loads a model). request_timeout: seconds for a
        request's line and headers (and the base of its body's)."""
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.api_key, self.max_images, self.quiet, self.max_queue = api_key or None, max_images, quiet, max_queue
        self.request_timeout = request_timeout
        self.loopback = _is_loopback(host)
        self.created = int(time.time())
        self.page = resources.files("mlx_starflow.cli").joinpath("web/index.html").read_bytes()
        self.files = Files()
        self.pipe = self.worker = self._thread = None
        self._deadlines, self._reading = {}, threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="mlx-starflow-deadlines", daemon=True)
        self._reaper.start()
        if pipe is not None:
            self.use(pipe)

    # -- deadlines: a connection still sending its request past its deadline is shut down

    def watch(self, handler, seconds: float):
        with self._reading:
            self._deadlines[handler] = time.monotonic() + seconds

    def unwatch(self, handler):
        with self._reading:
            self._deadlines.pop(handler, None)

    def _reap(self):
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._reading:
                late = [h for h, t in self._deadlines.items() if t < now]
                for h in late:
                    del self._deadlines[h]
            for h in late:
                h._expired = True
                log.info("%s: request not received in time; connection closed", h.client_address[0])
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        """A connection's exception outside a request's handling: a client that left is not news."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("connection from %s lost: %s", client_address[0], error)
        else:
            log.error("error on the connection from %s", client_address[0], exc_info=True)

    def use(self, pipe):
        self.pipe = pipe
        self.model_id = str(pipe.info.get("model") or "mlx-starflow")
        self.worker = Worker(pipe, self.max_queue)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def start(self) -> "Server":
        """Serve on a background thread (for apps and tests); close() stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="mlx-starflow-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> bool:
        """Stop serving, cancel the running request and remove the images folder; True
        if the worker ended within STOP_TIMEOUT."""
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        self._closed.set()
        stopped = self.worker.stop() if self.worker is not None else True
        self.files.remove()
        return stopped


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """What to tell someone who opens the server to other machines without a key."""
    if _is_loopback(host) or api_key:
        return None
    return (
        f"listening on {host} with no authentication: anyone who can reach this machine can use the model. "
        "Give --api-key (or $MLX_STARFLOW_API_KEY) to require a key."
    )


def exposure_refusal(host: str, api_key: Optional[str], insecure: bool) -> Optional[str]:
    """Why the command line will not listen on `host`: another machine's address needs a key,
    or --insecure-no-auth to say that no key is meant."""
    if insecure or exposure_warning(host, api_key) is None:
        return None
    return (
        f"--host {host} lets other machines in, and no --api-key (or $MLX_STARFLOW_API_KEY) is given: "
        "give a key, or --insecure-no-auth if anyone who can reach this machine may use the model"
    )


def parser():
    p = new_parser("server", "Serve a STARFlow model over the OpenAI images API, with a web page.")
    add_load_options(p)  # the model options are generate's (one definition of each: options.LoadOptions)
    p.add_argument(
        "--keep-text-encoder",
        action="store_true",
        help="keep the text encoder loaded between requests (faster prompts, more memory); "
        "by default it is loaded for each request and freed after encoding",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; anything but the loopback lets other machines in"
    )
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port, printed at start)")
    p.add_argument(
        "--max-queue",
        metavar="N",
        type=int,
        default=16,
        help="requests that may wait behind the one running; more are answered 429",
    )
    p.add_argument("--max-images", metavar="N", type=int, default=MAX_IMAGES, help="the largest n a request may ask")
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="require this bearer token on /v1 (default: $MLX_STARFLOW_API_KEY, else none)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="listen on another address than the loopback without --api-key (refused otherwise); requests must "
        "then name the server by its IP address or localhost",
    )
    p.add_argument("--quiet", action="store_true", help="warnings and errors only on stderr (no line per request)")
    return p


class _Stop(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise _Stop()


def main(argv=None):
    args = parser().parse_args(argv)
    for flag, value, low in (
        ("--port", args.port, 0),
        ("--max-queue", args.max_queue, 0),
        ("--max-images", args.max_images, 1),
    ):
        if value < low or (flag == "--port" and value > 65535):
            print(
                f"error: {flag} must be {'0..65535' if flag == '--port' else f'at least {low}'}, not {value}",
                file=sys.stderr,
            )
            return 1
    api_key = args.api_key or os.environ.get("MLX_STARFLOW_API_KEY") or None
    refusal = exposure_refusal(args.host, api_key, args.insecure_no_auth)
    if refusal:  # before binding anything
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _serve(args, api_key)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _serve(args, api_key) -> int:
    try:
        server = Server(None, args.host, args.port, args.max_queue, api_key, args.max_images)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    warning = exposure_warning(args.host, api_key)
    if warning:
        log.warning(warning)
    try:
        load = load_options(args)
        load.keep_text_encoder = args.keep_text_encoder
        pipe = Pipeline.from_pretrained(**vars(load))
        say_precision(pipe)
        server.use(pipe)
    except (ValueError, ModelNotFound, FileNotFoundError) as e:
        server.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        server.close()
        print("interrupted while loading the model", file=sys.stderr)
        return 130
    print(f"Serving {server.model_id} on {server.url}/ (API: {server.url}/v1)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    if not server.close():  # a step that does not end: leave without waiting for it (and without an abort)
        log.warning("the running request did not stop within %.0f s; exiting", STOP_TIMEOUT)
        sys.stderr.flush()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
