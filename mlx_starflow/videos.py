"""Every video in or out: MP4 (H.264) files written frame by frame and atomically, their
metadata (the generation parameters, as JSON in the MP4 `comment` tag), reading them
back, and frames as PNGs.

The codec comes with PyAV's wheels (FFmpeg with libx264 inside): no system FFmpeg is
needed. Without PyAV (or with a build lacking libx264) every writer fails with one line
saying how to install it.
"""

import json
import os
import secrets
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np
from PIL import Image

from .images import check_writable, engine_version, png_info, unwrite, write_all

try:  # the codec; the package depends on it, but a broken install gets one line, not a traceback
    import av
except ImportError:  # pragma: no cover - exercised by monkeypatching `av` to None
    av = None

CODEC = "libx264"
INSTALL = "pip install 'av>=14,<20'"
CRF = 18  # x264's constant quality: visually lossless for generated clips
META_KEY = "comment"  # the MP4 tag that carries the parameters (JSON)


class CodecMissing(ValueError):
    """No H.264 encoder: PyAV is not installed, or its build has no libx264."""


def check_codec():
    """Raise CodecMissing, one line with the fix, when MP4 files cannot be written."""
    if av is None:
        raise CodecMissing(f"writing MP4 needs PyAV, which is not installed: {INSTALL}")
    try:
        av.codec.Codec(CODEC, "w")
    except Exception:  # av raises UnknownCodecError (a ValueError) or FFmpegError
        raise CodecMissing(f"this PyAV build has no H.264 encoder ({CODEC}); reinstall its wheel: {INSTALL}") from None


def check_output(path, overwrite: bool = False) -> Path:
    """An MP4 output path that can be written (suffix, folder, no existing file unless overwrite)."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(
            f"--output '{path}': a clip is written as MP4 (H.264, carrying its parameters); name it .mp4"
            + (f", not {path.suffix}" if path.suffix else "")
        )
    check_writable([path], overwrite)
    return path


def _temporary(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    return parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def to_uint8(frame) -> np.ndarray:
    """A frame (H, W, 3) in [-1, 1] (float) or uint8 -> uint8 RGB."""
    a = np.asarray(frame)
    if a.dtype == np.uint8:
        return a
    return np.round((np.clip(a.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


class Mp4Writer:
    """An MP4 written one frame at a time into a temporary file beside `path`, renamed into
    place by `close()`; `abort()` (or leaving a `with` block by an exception) removes it, so
    the path holds a whole clip or nothing. Frames must be even-sized (H.264's 4:2:0)."""

    def __init__(self, path, fps: int, metadata: Optional[dict] = None):
        check_codec()
        self.path = Path(path)
        self.fps = int(fps)
        self.metadata = metadata or {}
        self.tmp = _temporary(self.path)
        self.frames = 0
        self._container = None
        self._stream = None

    def _open(self, height: int, width: int):
        if height % 2 or width % 2:
            raise ValueError(f"H.264 needs an even frame size, not {width}x{height}")
        try:
            self._container = av.open(str(self.tmp), "w", format="mp4", options={"movflags": "faststart"})
        except OSError as e:
            raise ValueError(f"could not write {self.path} ({e.strerror or e})") from None
        c = self._container
        if self.metadata:
            c.metadata[META_KEY] = json.dumps(self.metadata, ensure_ascii=False)
            if "prompt" in self.metadata:
                c.metadata["title"] = str(self.metadata["prompt"])
        s = c.add_stream(CODEC, rate=self.fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"crf": str(CRF)}
        self._stream = s

    def add(self, frame):
        """One frame (H, W, 3): uint8, or float in [-1, 1]."""
        f = to_uint8(frame)
        if f.ndim != 3 or f.shape[-1] != 3:
            raise ValueError(f"a frame must be (height, width, 3), got shape {f.shape}")
        if self._container is None:
            self._open(*f.shape[:2])
        elif (f.shape[1], f.shape[0]) != (self._stream.width, self._stream.height):
            raise ValueError(
                f"frame {self.frames} is {f.shape[1]}x{f.shape[0]}, the clip {self._stream.width}x{self._stream.height}"
            )
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        if self._container is None:
            raise ValueError(f"no frame was given: {self.path} not written")
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self):
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.abort()
        elif self._container is not None:
            self.close()
        return False


def write_mp4(path, frames: Iterable, fps: int, metadata: Optional[dict] = None) -> Path:
    """A whole clip (frames (H, W, 3), uint8 or in [-1, 1]) as an MP4, atomically."""
    writer = Mp4Writer(path, fps, metadata)
    try:
        for f in frames:
            writer.add(f)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def clip_metadata(prompt: str, seed: int, params: dict, load_options: Optional[dict] = None) -> dict:
    """What a clip's file records: the prompt, the seed, every setting, the loading options
    given and the engine (never a path)."""
    return {"prompt": prompt, "seed": seed, **params, **(load_options or {}), "engine": engine_version()}


def read_video(path):
    """(frames: list of uint8 (H, W, 3), fps: float, metadata: dict) of an MP4."""
    if av is None:
        raise CodecMissing(f"reading MP4 needs PyAV, which is not installed: {INSTALL}")
    try:
        with av.open(str(path)) as c:
            meta = _parse_meta(c.metadata)
            if not c.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = c.streams.video[0]
            fps = float(stream.average_rate or 0)
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except OSError as e:  # av.error.InvalidDataError and friends are OSErrors
        raise ValueError(f"{path}: not a video this package can read ({e})") from None
    return frames, fps, meta


def _parse_meta(tags) -> dict:
    text = tags.get(META_KEY)
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def read_metadata(path) -> dict:
    """The generation parameters an MP4 written by this package carries ({} for another MP4)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    if av is None:
        raise CodecMissing(f"reading MP4 needs PyAV, which is not installed: {INSTALL}")
    try:
        with av.open(str(path)) as c:
            return _parse_meta(c.metadata)
    except OSError as e:
        raise ValueError(f"{path}: not a video this package can read ({e})") from None


def frame_paths(folder, count: int) -> List[Path]:
    return [Path(folder) / f"frame-{i:04d}.png" for i in range(count)]


def unwrite_frames(paths) -> None:
    """Remove frames this run wrote (when the clip itself could not be written)."""
    unwrite(paths)


def _folder(folder, flag: str) -> Path:
    """A folder for PNGs, created if missing (its parent must exist)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder}: a file, not a folder")
    if not folder.exists():
        if not (folder.parent if str(folder.parent) else Path(".")).is_dir():
            raise ValueError(f"{flag} {folder}: its folder {folder.parent} does not exist")
        folder.mkdir()
    return folder


def preview_paths(folder, count: int, overwrite: bool = False) -> List[Path]:
    """`folder/preview-0000.png`, ... for a clip's previews, checked before sampling (the
    folder created if missing)."""
    paths = [_folder(folder, "--preview-dir") / f"preview-{i:04d}.png" for i in range(count)]
    check_writable(paths, overwrite)
    return paths


def save_preview(path, frame) -> Path:
    """One preview frame as a PNG, written whole (a temporary file renamed)."""
    img = Image.fromarray(to_uint8(frame))
    write_all([(Path(path), lambda tmp: img.save(tmp, format="PNG"))])
    return Path(path)


def save_frames(folder, frames: list, params: Optional[dict] = None, overwrite: bool = False) -> List[Path]:
    """Frames as PNGs `folder/frame-0000.png`, ... (each carrying the clip's parameters and
    its index): all written or none. The folder is created if missing (its parent must exist)."""
    folder = _folder(folder, "--frames-dir")
    paths = frame_paths(folder, len(frames))
    check_writable(paths, overwrite)
    files = []
    for i, (f, p) in enumerate(zip(frames, paths)):
        info = png_info({**(params or {}), "frame": i}) if params else None
        img = Image.fromarray(to_uint8(f))
        files.append((p, lambda tmp, img=img, info=info: img.save(tmp, format="PNG", pnginfo=info)))
    write_all(files)
    return paths
