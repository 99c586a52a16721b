"""The server's videos, in the shape of OpenAI's video API: `POST /v1/videos` queues a clip
and answers at once with its job (a `video` object: id, status, progress), `GET
/v1/videos/{id}` is its status, `GET /v1/videos/{id}/content` the MP4, `DELETE
/v1/videos/{id}` cancels it or removes it. Requests are checked here (JSON, or the
multipart form the official client sends; our parameters derived from video.VideoOptions)
before they reach the model; one thread makes the clips one at a time, in arrival order,
each written to the server's folder as it is decoded (videos.Mp4Writer)."""

import json
import queue
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from ..options import OptionError, specs
from ..video import VideoOptions, VideoPipeline
from ..videos import Mp4Writer, clip_metadata
from .api import MAX_FIELD, ApiError, _charset, _headers, _parts, parse_json

KEEP = 3600  # seconds a finished clip is kept
MAX_KEPT = 64  # finished clips kept at most (the oldest go first)
# What OpenAI's API sends that a flow has no use for: accepted and ignored (model does not switch models).
IGNORED = ("model", "user")
KINDS = {int: "integer", float: "number", str: "string"}


def request_params() -> dict:
    """{request name: (option name, meta)} of VideoOptions' request parameters, plus seed."""
    out = {}
    for name, _, m in specs(VideoOptions):
        req = m["request"]
        if req or name == "seed":
            out[name if req in (True, None) else req] = (name, m)
    return out


def limits() -> dict:
    """Every video parameter's range, as the checks apply it (GET /v1/models)."""
    out = {"seconds": {"type": "integer", "minimum": 1}, "size": {"type": "string", "pattern": "WxH"}}
    for req, (_, m) in request_params().items():
        entry = {"type": KINDS.get(m["kind"], "string")}
        if m["low"] is not None:
            entry.update(minimum=m["low"], maximum=m["high"])
        if m["choices"]:
            entry["enum"] = list(m["choices"])
        out[req] = entry
    return out


def parse_form(content_type: str, body: bytes) -> dict:
    """A multipart/form-data create (the official client's) -> {name: value}; numbers as
    JSON values. File parts (input_reference) are refused: image-to-video is not served."""
    head = _headers(f"Content-Type: {content_type}\r\n\r\n")
    boundary = head.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise ApiError(400, "the multipart body could not be read (a missing or wrong boundary?)")
    charset = _charset(head.get_param("charset"), None)
    fields = {}
    for headers, payload in _parts(body, boundary.encode("latin-1")):
        part = _headers(headers.decode("utf-8", errors="replace"))
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            continue
        if part.get_param("filename", header="content-disposition") is not None:
            raise ApiError(400, f"'{name}': files are not taken (text to video only)", name)
        if len(payload) > MAX_FIELD:
            raise ApiError(400, f"'{name}' is {len(payload)} bytes; a field has at most {MAX_FIELD}", name)
        text = payload.decode(_charset(part.get_content_charset() or charset, name), errors="replace")
        if name in ("prompt", "negative_prompt", "size", "model", "user", "sampler", "denoise"):
            fields[name] = text
        else:
            try:
                fields[name] = parse_json(text)
            except ApiError:
                fields[name] = text  # the type check names it
    return fields


def parse_create(pipe: VideoPipeline, body: dict) -> VideoOptions:
    """A create request -> resolved VideoOptions, or a 400 naming the parameter."""
    params = request_params()
    known = set(params) | {"seconds", "size", "input_reference"} | set(IGNORED)
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown parameter '{unknown[0]}'", unknown[0])
    if body.get("input_reference") is not None:
        raise ApiError(400, "'input_reference': image to video is not served (text to video only)", "input_reference")
    values = {}
    for req, (name, m) in params.items():
        v = body.get(req)
        if v is None:
            continue
        if m["kind"] is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok = (
            isinstance(v, str)
            if m["kind"] is str
            else isinstance(v, (int, float)) and not isinstance(v, bool) and (m["kind"] is float or isinstance(v, int))
        )
        if not ok:
            kind = KINDS.get(m["kind"], "string")
            raise ApiError(
                400, f"'{req}' must be {'an' if kind == 'integer' else 'a'} {kind}, not {json.dumps(v)}", req
            )
        values[name] = v
    if not isinstance(values.get("prompt"), str) or not values["prompt"].strip():
        raise ApiError(400, "'prompt' is required: what the clip shows", "prompt")
    size = body.get("size")
    if size is not None:
        sizes = {f"{w}x{h}": a for a, (h, w) in pipe.sizes().items()}
        if size not in sizes:
            raise ApiError(
                400, f"'size' must be one of {', '.join(sizes)} for this model, not {json.dumps(size)}", "size"
            )
        values["aspect_ratio"] = sizes[size]
    seconds = body.get("seconds")
    if seconds is not None and "frames" not in values:
        if isinstance(seconds, str) and seconds.strip().isdigit():
            seconds = int(seconds)
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= 60:
            raise ApiError(400, f"'seconds' must be a whole number from 1 to 60, not {json.dumps(seconds)}", "seconds")
        fps = values.get("fps") or pipe.video.fps
        f = pipe.temporal_factor
        values["frames"] = max(1, round(seconds * fps / f)) * f + (1 if f > 1 else 0)
    names = {name: req for req, (name, _) in params.items()}
    try:
        return pipe.resolve_options(VideoOptions(**values))
    except OptionError as e:
        raise ApiError(400, str(e), names.get(e.option, e.option)) from None
    except ValueError as e:  # a prompt the model does not know
        raise ApiError(400, str(e), "prompt") from None


class VideoJob:
    def __init__(self, opts: VideoOptions, model: str, size: str):
        self.id = "video_" + secrets.token_hex(12)
        self.opts, self.model, self.size = opts, model, size
        self.status, self.progress, self.error = "queued", 0, None
        self.created_at, self.completed_at = int(time.time()), None
        self.path: Optional[Path] = None
        self.cancelled = threading.Event()

    def card(self) -> dict:
        """The OpenAI `video` object, with ours: frames, fps, seed."""
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None if self.completed_at is None else self.completed_at + KEEP,
            "error": self.error,
            "prompt": self.opts.prompt,
            "seconds": str(round(self.opts.frames / self.opts.fps, 2)),
            "size": self.size,
            "remixed_from_video_id": None,
            "frames": self.opts.frames,
            "fps": self.opts.fps,
            "seed": self.opts.seed,
        }


# The share of a job's progress (percent) each stage spans; a job's progress is the sum of
# each stage's share times its part done, so a streamed clip, whose deep and shallow
# blocks take turns frame by frame, moves forward as one that takes them one after the other.
PROGRESS = {"text": 2, "deep": 58, "shallow": 25, "denoise": 5, "frame": 10}


class VideoJobs:
    """The clips: jobs by id, a bounded queue, one thread making them, files in a folder of their own."""

    def __init__(self, pipe: VideoPipeline, model: str, max_queue: int = 16):
        self.pipe, self.model, self.max_queue = pipe, model, max_queue
        self.folder = Path(tempfile.mkdtemp(prefix="mlx-starflow-videos-"))
        self.jobs: dict = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlx-starflow-videos", daemon=True)
        self._thread.start()

    def submit(self, opts: VideoOptions) -> VideoJob:
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.status == "queued")
            if waiting >= self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy: {waiting} clips are waiting",
                    code="queue_full",
                    headers={"Retry-After": 30},
                )
            h, w = self.pipe.sizes()[opts.aspect_ratio]
            job = VideoJob(opts, self.model, f"{w}x{h}")
            self.jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> VideoJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no video '{job_id}' (clips are kept for an hour)", "video_id", code="not_found")
        return job

    def delete(self, job_id: str) -> VideoJob:
        job = self.get(job_id)
        job.cancelled.set()
        with self._lock:
            self.jobs.pop(job_id, None)
        if job.path is not None:
            job.path.unlink(missing_ok=True)
        return job

    def _forget_old(self):
        done = [j for j in self.jobs.values() if j.completed_at is not None]
        now = time.time()
        done.sort(key=lambda j: j.completed_at)
        for j in done:
            if now - j.completed_at > KEEP or len(done) > MAX_KEPT:
                self.jobs.pop(j.id, None)
                if j.path is not None:
                    j.path.unlink(missing_ok=True)
                done = done[1:]

    def _loop(self):
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if job.cancelled.is_set():
                continue
            self._run(job)

    def _run(self, job: VideoJob):
        job.status = "in_progress"
        path = self.folder / f"{job.id}.mp4"
        opts = job.opts
        params = clip_metadata(opts.prompt, opts.seed, self.pipe.params(opts))
        try:
            with Mp4Writer(path, opts.fps, params) as writer:
                steps = self.pipe.generate_steps(opts)
                parts = {}
                for event in steps:
                    if job.cancelled.is_set() or self._stop.is_set():
                        steps.close()
                        raise _Cancelled()
                    if event.stage in PROGRESS:
                        parts[event.stage] = event.done / max(event.total, 1)
                    done = sum(PROGRESS[stage] * part for stage, part in parts.items())
                    job.progress = max(job.progress, min(99, int(done)))
                    if event.stage == "frame":
                        writer.add(event.frame)
        except _Cancelled:
            job.status, job.error = "failed", {"code": "cancelled", "message": "the clip was cancelled"}
        except Exception as e:  # a failure of the model: the job says so, the server goes on
            job.status, job.error = "failed", {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}
        else:
            job.path, job.status, job.progress = path, "completed", 100
        job.completed_at = int(time.time())

    def stop(self, timeout: float = 10.0) -> bool:
        self._stop.set()
        for job in list(self.jobs.values()):
            job.cancelled.set()
        self._thread.join(timeout)
        shutil.rmtree(self.folder, ignore_errors=True)
        return not self._thread.is_alive()


class _Cancelled(Exception):
    pass
