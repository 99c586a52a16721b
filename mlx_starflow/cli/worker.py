"""The server's worker: one thread runs the requests on the loaded model in arrival order,
a bounded queue in front of it; events go to the connection threads as dataclasses; images
asked for by URL are kept in the server's own folder for an hour."""

import logging
import math
import queue
import re
import secrets
import select
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..images import atomic_write, engine_version, png_bytes
from .api import FILE_NAME, FILE_TTL, PROGRESS_EVERY, STOP_TIMEOUT, Output

log = logging.getLogger("mlx_starflow.server")


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
