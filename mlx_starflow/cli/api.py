"""The OpenAI images API's requests, checked before anything reaches the model: JSON and
multipart bodies read within limits, every parameter typed and ranged (ours derived from
options.GenerateOptions), the answer's format. Nothing here touches the model."""

import json
import logging
import math
import re
from dataclasses import dataclass, field
from email.parser import HeaderParser
from email.policy import HTTP
from typing import Optional

from ..images import MAX_IMAGE_PIXELS, probe
from ..options import GenerateOptions, specs

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
