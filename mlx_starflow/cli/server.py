"""python -m mlx_starflow.server: the OpenAI images API and a web page, on one resident model
(one concern: HTTP; requests are checked in api.py, run by worker.py).

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
import os
import queue
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from ..editing import check_strength, edit_steps
from ..images import png_bytes
from ..loading.hub import ModelNotFound
from ..loading.video_resolve import is_video_model
from ..options import GenerateOptions
from ..pipeline import Pipeline
from ..video import VideoOptions, VideoPipeline
from .api import (  # noqa: F401 (MAX_PARTS, parse_request: as this module always had them)
    BODY_RATE,
    EDIT_PARAMS,
    KEEPALIVE,
    LOOPBACK_NAMES,
    MAX_IMAGES,
    MAX_JSON,
    MAX_PARTS,
    MAX_UPLOAD,
    POLL,
    REQUEST_TIMEOUT,
    STOP_TIMEOUT,
    ApiError,
    limits,
    model_sizes,
    parse_json,
    parse_multipart,
    parse_request,
)
from .common import add_load_options, load_options, new_parser, prefer_openblas, say_precision
from .video_jobs import VideoJobs, parse_create, parse_form
from .video_jobs import limits as video_limits
from .worker import FINAL, Cancelled, Failed, Files, Invalid, Job, Partial, Progress, QueueFull, Worker, result_pngs

log = logging.getLogger("mlx_starflow.server")


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
                "/v1/videos/": self._video_get,
            }
        )

    def do_POST(self):
        self._dispatch(
            {"/v1/images/generations": self._generations, "/v1/images/edits": self._edits, "/v1/videos": self._videos}
        )

    def do_DELETE(self):
        self._dispatch({"/v1/videos/": self._video_delete})

    # -- GET

    def _page(self, path):
        self._send(
            200,
            self.server.page,
            "text/html; charset=utf-8",
            {
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "media-src 'self' blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    def _health(self, path):
        self._json(200, {"status": "ok", "model": self.server.model_id, **self.server.worker.state()})

    def _model_card(self) -> dict:
        pipe = self.server.pipe
        if self.server.videos is not None:
            return self._video_card(pipe)
        # the defaults a request gets (the model's own), for a prompt this model takes
        examples = getattr(pipe, "examples", None)
        first = pipe.classes.labels[0] if pipe.classes is not None else examples[0] if examples else "a"
        opts = pipe.resolve_options(GenerateOptions(first))
        return {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-starflow",
            # ours: what the page offers
            "sizes": model_sizes(pipe),
            "prompts": pipe.classes.labels if pipe.classes is not None else None,
            "examples": getattr(pipe, "examples", None),  # a text model's example prompts (free prompts too)
            "guidance": opts.guidance,
            "sampler": opts.sampler,
            "max_images": self.server.max_images,
            "limits": limits(self.server.max_images),  # every parameter's range, as the checks apply it
        }

    def _video_card(self, pipe) -> dict:
        """A video model's card: what the page offers (sizes, prompts, frames, fps) and every limit."""
        label = pipe.classes.labels[0] if pipe.classes is not None else "a"
        opts = pipe.resolve_options(VideoOptions(label, seed=0))
        return {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-starflow",
            "video": True,
            "sizes": [f"{w}x{h}" for h, w in pipe.sizes().values()],
            "prompts": pipe.classes.labels if pipe.classes is not None else None,
            "guidance": opts.guidance,
            "sampler": opts.sampler,
            "frames": opts.frames,
            "fps": opts.fps,
            "limits": video_limits(),
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

    def _no_images(self):
        if self.server.videos is not None:
            raise ApiError(400, f"{self.server.model_id} is a video model: ask it for a clip with POST /v1/videos")

    def _generations(self, path):
        body = self._json_body()
        self._no_images()
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
        self._no_images()
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

    # -- videos (OpenAI's video API: a job, its status, its content)

    def _video_jobs(self) -> VideoJobs:
        if self.server.videos is None:
            raise ApiError(400, f"{self.server.model_id} is an image model: POST /v1/images/generations")
        return self.server.videos

    def _videos(self, path):
        content_type = self.headers.get("Content-Type", "")
        if content_type.lower().startswith("multipart/form-data"):
            body = self._read_body(MAX_JSON)
            self._check_origin()
            self._check_key()
            fields = parse_form(content_type, body)
        else:
            fields = self._json_body()
        jobs = self._video_jobs()
        try:
            opts = parse_create(jobs.pipe, fields)
        except ApiError:
            self.server.worker.count("invalid")
            raise
        self._json(200, jobs.submit(opts).card())

    def _video_get(self, path):
        self._check_key()
        rest = path[len("/v1/videos/") :]
        job_id, _, tail = rest.partition("/")
        job = self._video_jobs().get(job_id)
        if tail == "":
            self._json(200, job.card())
            return
        if tail != "content":
            raise ApiError(404, f"no route GET {path}", code="not_found")
        variant = parse_qs(urlsplit(self.path).query).get("variant", ["video"])[0]
        if variant != "video":
            raise ApiError(400, f"'variant' {variant!r} is not served: only 'video' (the MP4)", "variant")
        if job.status != "completed" or job.path is None:
            raise ApiError(404, f"video '{job_id}' is {job.status}, not completed", "video_id", code="not_ready")
        self._send(200, job.path.read_bytes(), "video/mp4", {"Cache-Control": "private, max-age=3600"})

    def _video_delete(self, path):
        self._check_origin()
        self._check_key()
        job = self._video_jobs().delete(path[len("/v1/videos/") :])
        self._json(200, {"id": job.id, "object": "video.deleted", "deleted": True})

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
        self.pipe = self.worker = self._thread = self.videos = None
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
        if isinstance(pipe, VideoPipeline):  # a video model: its clips are jobs (OpenAI's video API)
            self.videos = VideoJobs(pipe, self.model_id, self.max_queue)

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
        if self.videos is not None:
            stopped = self.videos.stop() and stopped
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
    if argv is None:
        argv = prefer_openblas(sys.argv[1:])
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
        if is_video_model(load.model, load.checkpoint, load.config):  # STARFlow-V: POST /v1/videos
            pipe = VideoPipeline.from_pretrained(
                load.model,
                dtype=load.dtype,
                quantize=load.quantize,
                q_group_size=load.q_group_size,
                text_encoder=load.text_encoder,
                vae=load.vae,
                text_dtype=load.text_dtype,
                text_quantize=load.text_quantize,
                vae_dtype=load.vae_dtype,
                keep_text_encoder=load.keep_text_encoder,
                checkpoint=load.checkpoint,
                config=load.config,
            )
        else:
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
