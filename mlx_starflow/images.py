"""Every picture in or out: opening and checking images and masks (modes, sizes,
resize/crop), PIL <-> arrays, PNG metadata in and out, and atomic writes (a file is
written whole or not at all)."""

import io
import json
import math
import os
import re
import secrets
import warnings
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

ENGINE = "mlx-starflow"
# The most pixels an image read may have: the models make at most 4096x4096 (options.MAX_SIDE)
# and every input is resized to the model's size, so more only costs memory. Every image is
# checked from its header, before its pixels are decoded; Pillow's own decompression-bomb
# limit is set to the same (it refuses twice this, in any reader of this process).
MAX_IMAGE_PIXELS = 4096 * 4096
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Over the limit an image is refused with a message (check_pixels); Pillow's warning would repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
GRAYSCALE = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# A mask is black (keep) and white (may change); resampling and compression blur its
# edges, so this share of its pixels may be grey (between MASK_LOW and MASK_HIGH).
MASK_GREY = 0.05
MASK_LOW, MASK_HIGH = 0.2, 0.8


def engine_version() -> str:
    try:
        return f"{ENGINE} {metadata.version('mlx-starflow')}"
    except metadata.PackageNotFoundError:
        return f"{ENGINE} (source)"


# -- arrays <-> PIL ------------------------------------------------------------------------


def to_pil(images) -> list:
    """Images in [-1, 1], (B, H, W, C) or (H, W, C) with C = 3 or 1 -> 8-bit PIL images."""
    x = np.array(images.astype(mx.float32) if isinstance(images, mx.array) else images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"to_pil expects NHWC images with 1 or 3 channels; got shape {x.shape}")
    x = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if x.shape[-1] == 1:
        return [Image.fromarray(im[..., 0], mode="L") for im in x]
    return [Image.fromarray(im, mode="RGB") for im in x]


def from_pil(images, size=None, factor: int = 8) -> mx.array:
    """PIL image(s) -> NHWC float32 in [-1, 1] for `VAE.encode`.

    `size` is an int (square) or (width, height); the image is resized so it
    covers that size (shorter side first) and centre-cropped. Without `size`
    it is only centre-cropped to multiples of `factor`.
    """
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        if size is None:
            tw, th = w - w % factor, h - h % factor
            if tw == 0 or th == 0:
                raise ValueError(f"image of {w}x{h} is smaller than the VAE downsampling factor {factor}")
        else:
            tw, th = (size, size) if isinstance(size, int) else size
            if tw % factor or th % factor:
                raise ValueError(f"size {tw}x{th} is not a multiple of the VAE downsampling factor {factor}")
            scale = max(tw / w, th / h)
            rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
            if (rw, rh) != (w, h):
                img = img.resize((rw, rh), Image.Resampling.BICUBIC)
            w, h = rw, rh
        left, top = (w - tw) // 2, (h - th) // 2
        img = img.crop((left, top, left + tw, top + th))
        out.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    if len({a.shape for a in out}) > 1:
        raise ValueError("from_pil got images of different sizes; pass `size` to make them equal")
    return mx.array(np.stack(out))


# -- images in ------------------------------------------------------------------------------


def _name(item, i: int) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image {i + 1}"


def check_pixels(img, name: str):
    """A ValueError if the image (opened, not yet decoded) has more than MAX_IMAGE_PIXELS pixels."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(_too_large(f"{name} is {w}x{h}", w * h))


def _too_large(what: str, pixels: int) -> str:
    side = math.isqrt(MAX_IMAGE_PIXELS)
    return (
        f"{what} ({pixels} pixels); at most {MAX_IMAGE_PIXELS} pixels ({side}x{side}) are read: "
        "give a smaller image (the model's own size is enough)"
    )


def probe(source, name: str, what: str = "a PNG, JPEG or other still image Pillow can open"):
    """A file, path or the bytes of one -> the image opened from its header only, its pixel
    count checked (nothing decoded yet), or a ValueError naming it."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError as e:  # twice the limit: Pillow's own refusal, before any size is known
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise ValueError(_too_large(f"{name} is too large", int(size[1]) if size else 2 * MAX_IMAGE_PIXELS)) from None
    except UNREADABLE as e:
        reason = "not an image file Pillow can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise ValueError(f"cannot read {name} as an image ({reason}); give {what}") from None
    check_pixels(img, name)
    return img


def _decode(source, name: str, what: str = "a PNG, JPEG or other still image Pillow can open"):
    """probe, then the pixels decoded (once)."""
    img = probe(source, name, what)
    try:
        img.load()
    except UNREADABLE as e:
        raise ValueError(f"cannot read {name} as an image ({e}); give {what}") from None
    return img


def open_image(item, name: Optional[str] = None):
    """A path, the bytes of an image file, a PIL image or a uint8 array (H, W, 3) -> an RGB
    PIL image, or a ValueError naming the problem: missing or unreadable file, more than
    MAX_IMAGE_PIXELS pixels (checked before decoding), animated image, grayscale or not 3
    channels, not uint8."""
    name = name or _name(item, 0)
    if isinstance(item, mx.array):
        item = np.array(item)
    if isinstance(item, np.ndarray):
        if item.ndim == 2 or (item.ndim == 3 and item.shape[-1] == 1):
            raise ValueError(
                f"{name} is grayscale (shape {item.shape}); the model takes RGB images: "
                "give an (height, width, 3) array"
            )
        if item.ndim != 3 or item.shape[-1] != 3:
            raise ValueError(
                f"{name} has shape {item.shape}; the model takes RGB images: give an "
                "(height, width, 3) uint8 array"
                + (" (drop the alpha channel: a[..., :3])" if item.ndim == 3 and item.shape[-1] == 4 else "")
            )
        if item.dtype != np.uint8:
            raise ValueError(
                f"{name} is a {item.dtype} array; give 8-bit values (uint8, 0..255), e.g. "
                "np.round(a * 255).astype(np.uint8) for floats in [0, 1]"
            )
        return Image.fromarray(item, "RGB")
    if isinstance(item, Image.Image):
        img = item
    elif isinstance(item, (bytes, bytearray)):
        img = _decode(item, name)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if path.is_dir():
            raise ValueError(f"{name} is a folder, not an image file")
        if not path.exists():
            raise ValueError(f"{name}: no such file")
        img = _decode(path, name)
    else:
        raise ValueError(f"{name} is a {type(item).__name__}; give a path, a PIL image or a uint8 array")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise ValueError(
            f"{name} is animated or has several pages ({frames} frames); the model takes still "
            "images: save the frame you want as a PNG"
        )
    if img.mode in GRAYSCALE:
        raise ValueError(
            f"{name} is grayscale (mode {img.mode}); the model takes RGB images: convert it to RGB "
            "first (e.g. PIL's image.convert('RGB')) to use its grey version"
        )
    return img.convert("RGB") if img.mode != "RGB" else img


def image_items(images) -> list:
    if isinstance(images, mx.array):
        images = np.array(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray)):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise ValueError(f"images must be a path, PIL image, uint8 array or a list of them, not {type(images).__name__}")


def load_images(images, size, resize: bool = True) -> Tuple[mx.array, List[Tuple[int, int]]]:
    """Paths, PIL images or uint8 arrays (H, W, 3) (one, a list, or an (N, H, W, 3)
    array) -> (images (N, H, W, 3) float32 in [-1, 1], each input's (width, height)).

    `size` is an int (square) or (width, height). As the reference's data pipeline,
    an image of another size is resized (bicubic) so it covers the size, then
    centre-cropped (vae.from_pil). An image smaller than the size is refused (its
    upscaled pixels would be invented, not scored); with resize=False any other
    size is refused. Bad input raises ValueError naming the image and the fix."""
    tw, th = (size, size) if isinstance(size, int) else size
    items = image_items(images)
    if not items:
        raise ValueError("give at least one image")
    out, sizes = [], []
    for i, item in enumerate(items):
        name = _name(item, i)
        img = open_image(item, name)
        w, h = img.size
        if (w, h) != (tw, th):
            if not resize:
                raise ValueError(
                    f"{name} is {w}x{h}; this model takes {tw}x{th} images and resizing is off: "
                    f"resize it to {tw}x{th}, or allow resizing (drop --no-resize / resize=False)"
                )
            if w < tw or h < th:
                raise ValueError(
                    f"{name} is {w}x{h}, smaller than the {tw}x{th} this model takes: upscaling "
                    f"would invent its pixels; give an image of at least {tw}x{th}"
                )
        out.append(from_pil(img, (tw, th), factor=1))
        sizes.append((w, h))
    return mx.concatenate(out), sizes


# -- masks ---------------------------------------------------------------------------------


def read_mask(mask) -> tuple:
    """A mask (path, the bytes of an image file, PIL image, or (H, W) array of 0..1 or bool)
    -> (values (H, W, C) in [0, 1], label for messages). A file's pixel count is checked
    before it is decoded."""
    label = f"mask {mask}" if isinstance(mask, (str, os.PathLike)) else "mask"
    if isinstance(mask, (mx.array, np.ndarray)):
        a = np.array(mask, dtype=np.float32)
        return (a if a.ndim == 3 else a[..., None]), label
    if isinstance(mask, (str, os.PathLike)):
        if not Path(mask).is_file():
            raise ValueError(f"{label}: no such file")
        img = _decode(mask, label, "a black and white PNG")
    elif isinstance(mask, (bytes, bytearray)):
        img = _decode(mask, label, "a black and white PNG")
    elif isinstance(mask, Image.Image):
        img = mask
    else:
        raise ValueError(f"mask must be a path, a PIL image or an (height, width) array, not {type(mask).__name__}")
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"{label} is animated ({img.n_frames} frames); give a single black and white image")
    if img.mode in ("P", "1", "RGBA", "LA", "PA", "La", "RGBa"):  # alpha does not mark the region; the colour does
        img = img.convert("RGB" if img.mode in ("P", "RGBA", "PA", "RGBa") else "L")
    top = {"L": 255.0, "RGB": 255.0, "I": 65535.0, "I;16": 65535.0, "F": 1.0}.get(img.mode)
    if top is None:
        raise ValueError(f"{label} is a {img.mode} image, not a mask; give a black and white image")
    a = np.asarray(img, dtype=np.float32) / top
    return (a if a.ndim == 3 else a[..., None]), label


def mask_values(mask) -> tuple:
    """A mask -> (bool (H, W), white = True (may change); its label for messages). It must be (nearly) black and
    white: at most MASK_GREY of its pixels may be grey (between MASK_LOW and MASK_HIGH)
    or coloured (black in one channel, white in another), else ValueError."""
    a, label = read_mask(mask)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{label} must be (height, width) or (height, width, 3), got shape {a.shape}")
    grey = ((a > MASK_LOW) & (a < MASK_HIGH)).any(-1)
    mixed = (a >= 0.5).any(-1) != (a >= 0.5).all(-1)
    unclear = float((grey | mixed).mean())
    if unclear > MASK_GREY:
        raise ValueError(
            f"{label} is not a mask: {unclear:.0%} of its pixels are neither black nor white "
            f"(at most {MASK_GREY:.0%} may be, at blurred edges). A mask is white where the "
            f"image may change and black where it must stay"
        )
    return a.mean(-1) >= 0.5, label


# -- images out ----------------------------------------------------------------------------


def output_paths(template: str, seeds, count: int):
    """One path per image; a template without {seed}/{index} gets -{index} for several images.
    The commands write PNG files (their parameters ride in PNG text chunks): another
    extension is refused rather than written with PNG bytes inside."""
    suffix = Path(template.replace("{seed}", "0").replace("{index}", "0")).suffix
    if suffix.lower() != ".png":
        raise ValueError(
            f"--output '{template}': this command writes PNG files (which carry their parameters); "
            f"name it .png{f', not {suffix}' if suffix else ''} and convert it afterwards if you need another format"
        )
    if count > 1 and "{seed}" not in template and "{index}" not in template:
        stem, dot, ext = template.rpartition(".")
        template = f"{stem}-{{index}}.{ext}" if dot else f"{template}-{{index}}"
    paths = []
    for i in range(count):
        seed = seeds[i] if seeds else "latents"
        try:
            paths.append(Path(template.format(seed=seed, index=i)))
        except (KeyError, IndexError, ValueError, AttributeError):
            raise ValueError(f"--output '{template}': only {{seed}} and {{index}} may be used") from None
    if len(set(paths)) != len(paths):
        raise ValueError(f"--output '{template}' gives the same file name to several images; add {{index}}")
    return paths


def sidecar(path: Path) -> Path:
    """The JSON file beside an image that --metadata writes."""
    return path.with_suffix(".json")


def check_writable(paths, overwrite, sidecars: bool = False):
    """Every output can be written: not a folder, its folder exists and is writable, and no
    existing file (image or, with sidecars, its JSON) is replaced without `overwrite`."""
    for p in paths:
        for q in (p, sidecar(p)) if sidecars else (p,):
            if q.is_dir():
                raise ValueError(f"cannot write {q}: it is a folder; give --output a file name (e.g. {q}/out.png)")
            if q.exists() and not overwrite:
                raise ValueError(f"{q} already exists; choose another --output or pass --overwrite")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ValueError(f"cannot write {p}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {p}: folder {parent} is not writable")


def png_info(params: dict):
    info = PngInfo()
    for k, v in params.items():
        info.add_text(k, str(v))
    info.add_text("parameters", json.dumps(params))
    return info


def read_metadata(path) -> dict:
    """The generation parameters stored in a PNG written by this command."""
    with Image.open(path) as im:
        text = dict(im.text)
    return json.loads(text["parameters"]) if "parameters" in text else text


def atomic_write(path: Path, write):
    """One file written whole or not at all."""
    write_all([(path, write)])


def write_json(path, data):
    """Write data as JSON to path atomically (a partial file never appears)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def _temporary(path: Path) -> Path:
    # Created with 0666 so the user's umask decides the mode, as for any program's output
    # (mkstemp would make it 0600).
    tmp = (path.parent if str(path.parent) else Path(".")) / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def write_all(files):
    """Write several files all or none: files is [(path, write(tmp))]; each is written to a
    temporary file beside its path, and only when all are written are they renamed into
    place. A failure (a full disk, a removed folder) leaves none of them and says which."""
    done = []
    try:
        for path, write in files:
            tmp = _temporary(path)
            done.append((tmp, path))
            write(tmp)
    except OSError as e:
        for tmp, _ in done:
            Path(tmp).unlink(missing_ok=True)
        raise ValueError(
            f"could not write {done[-1][1] if done else files[0][0]} ({e.strerror or e}); none of the "
            f"{len(files)} files was written"
        ) from None
    except BaseException:
        for tmp, _ in done:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in done:
        os.replace(tmp, path)


def unwrite(paths, sidecars: bool = False) -> List[Path]:
    """Remove files this run wrote (a run that failed part way leaves no partial set);
    returns those removed."""
    gone = []
    for p in paths:
        for q in (p, sidecar(p)) if sidecars else (p,):
            if q.is_file():
                q.unlink()
                gone.append(q)
    return gone


def save(result, paths, metadata_sidecar=False, load_options=None):
    """The images as PNGs carrying their parameters (and the options the model was loaded with),
    with a JSON sidecar each when asked: all written, or none (write_all)."""
    version = engine_version()
    files = []
    for i, (img, path) in enumerate(zip(result.images, paths)):
        params = {"prompt": result.prompts[i], **result.params, **(load_options or {}), "engine": version}
        if result.seeds:
            params["seed"] = result.seeds[i]
        files.append((path, lambda tmp, img=img, params=params: img.save(tmp, format="PNG", pnginfo=png_info(params))))
        if metadata_sidecar:
            text = json.dumps(params, indent=2) + "\n"
            files.append((sidecar(path), lambda tmp, text=text: Path(tmp).write_text(text)))
    write_all(files)


def png_bytes(image, params: Optional[dict] = None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(params) if params else None)
    return buf.getvalue()
