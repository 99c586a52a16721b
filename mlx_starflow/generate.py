"""python -m mlx_starflow.generate --prompt "a cat playing piano"

Writes PNG files that carry their generation parameters in PNG text chunks
(read them back with `read_metadata`). Existing files are never overwritten
unless --overwrite is given, and files are written whole or not at all.
"""

import argparse
import json
import math
import os
import secrets
import sys
from importlib import metadata
from pathlib import Path

from .hub import DEFAULT_MODEL, ModelNotFound

ENGINE = "mlx-starflow"
STAGES = {"text": "Encoding prompt", "deep": "Deep block", "shallow": "Shallow blocks",
          "denoise": "Denoising", "decode": "Decoding"}


def engine_version() -> str:
    try:
        return f"{ENGINE} {metadata.version('mlx-starflow')}"
    except metadata.PackageNotFoundError:
        return f"{ENGINE} (source)"


def parser():
    p = argparse.ArgumentParser(prog="python -m mlx_starflow.generate",
                                description="Generate images with STARFlow on MLX.")
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt for guidance (default: empty)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="'demo', a converted folder, a .pth checkpoint or folder, or a Hugging Face repo id")
    p.add_argument("--checkpoint", default=None, help="checkpoint file name inside --model (repo or folder)")
    p.add_argument("--config", default=None, help="the reference YAML config of the checkpoint")
    p.add_argument("--text-encoder", default=None, help="text encoder folder or repo (default: named by the model)")
    p.add_argument("--vae", default=None, help="VAE folder or repo (default: named by the model)")
    p.add_argument("--seed", type=int, nargs="+", default=None, help="one seed, or one per image")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default 3.6, or the model's own)")
    p.add_argument("--sampler", choices=["jacobi", "sequential"], default=None)
    p.add_argument("--jacobi-block-size", type=int, default=16)
    p.add_argument("--jacobi-threshold", type=float, default=1e-3)
    p.add_argument("--jacobi-max-iter", type=int, default=32)
    p.add_argument("--denoise", choices=["auto", "score", "learned", "none"], default="auto")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="flow weights precision (auto: bfloat16 for float32 models above 1B parameters, "
                        "else as stored)")
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="quantize the flow's linear layers")
    p.add_argument("--text-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="text encoder precision (T5 overflows in float16)")
    p.add_argument("--text-quantize", type=int, choices=[4, 8], default=None, help="quantize the text encoder")
    p.add_argument("--vae-dtype", choices=["float32", "bfloat16"], default="float32", help="VAE precision")
    p.add_argument("--vae-tile", type=int, default=None, help="decode in tiles of this many latents (less memory)")
    p.add_argument("--output", default="starflow-{seed}.png",
                   help="output PNG; {seed} and {index} are replaced (default starflow-{seed}.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--metadata", action="store_true", help="also write a JSON sidecar next to each image")
    p.add_argument("--verbose", action="store_true", help="print stage timings and peak memory")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only when stderr is a terminal)")
    return p


def output_paths(template: str, seeds, count: int):
    """One path per image; a template without {seed}/{index} gets -{index} for several images."""
    if count > 1 and "{seed}" not in template and "{index}" not in template:
        stem, dot, ext = template.rpartition(".")
        template = f"{stem}-{{index}}.{ext}" if dot else f"{template}-{{index}}"
    paths = []
    for i in range(count):
        seed = seeds[i] if seeds else "latents"
        try:
            paths.append(Path(template.format(seed=seed, index=i)))
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"--output '{template}': only {{seed}} and {{index}} may be used")
    if len(set(paths)) != len(paths):
        raise ValueError(f"--output '{template}' gives the same file name to several images; add {{index}}")
    return paths


def check_writable(paths, overwrite):
    for p in paths:
        if p.exists() and not overwrite:
            raise ValueError(f"{p} already exists; choose another --output or pass --overwrite")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise ValueError(f"cannot write {p}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"cannot write {p}: folder {parent} is not writable")


def png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in params.items():
        info.add_text(k, str(v))
    info.add_text("parameters", json.dumps(params))
    return info


def read_metadata(path) -> dict:
    """The generation parameters stored in a PNG written by this command."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(im.text)
    return json.loads(text["parameters"]) if "parameters" in text else text


def _atomic_write(path: Path, write):
    # Created with 0666 so the user's umask decides the mode, as for any program's output
    # (mkstemp would make it 0600).
    tmp = (path.parent if str(path.parent) else Path(".")) / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(result, paths, metadata_sidecar=False):
    version = engine_version()
    for i, (img, path) in enumerate(zip(result.images, paths)):
        params = {"prompt": result.prompts[i], **result.params, "engine": version}
        if result.seeds:
            params["seed"] = result.seeds[i]
        _atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=png_info(params)))
        if metadata_sidecar:
            side = path.with_suffix(".json")
            _atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2) + "\n"))


class Bars:
    """One tqdm bar per stage, on a terminal only: a log or a pipe gets no redraws."""

    def __init__(self, enabled):
        self.enabled, self.bar, self.stage = enabled and sys.stderr.isatty(), None, None

    def __call__(self, stage, done, total):
        if not self.enabled:
            return True
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = "tok" if stage in ("deep", "shallow") else ""
            self.bar = tqdm(total=total, desc=STAGES.get(stage, stage), unit=unit, leave=False, file=sys.stderr)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        return True

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv=None):
    args = parser().parse_args(argv)
    from .flow import Cancelled
    from .pipeline import Pipeline, expand_seeds

    bars = Bars(not args.no_progress)
    try:
        count = len(args.prompt) * args.num_images
        if args.num_images < 1:
            raise ValueError(f"--num-images must be at least 1, not {args.num_images}")
        seeds = expand_seeds(args.seed, count)
        paths = output_paths(args.output, seeds, count)
        check_writable(paths, args.overwrite)
        pipe = Pipeline.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize,
                                        text_encoder=args.text_encoder, vae=args.vae,
                                        checkpoint=args.checkpoint, config=args.config,
                                        text_dtype=args.text_dtype, text_quantize=args.text_quantize,
                                        vae_dtype=args.vae_dtype, vae_tile=args.vae_tile)
        result = pipe.generate(args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images,
                               seed=seeds, guidance=args.cfg, sampler=args.sampler,
                               jacobi_block_size=args.jacobi_block_size, jacobi_threshold=args.jacobi_threshold,
                               jacobi_max_iter=args.jacobi_max_iter, denoise=args.denoise, height=args.height,
                               width=args.width, progress=bars)
        bars.close()
        save(result, paths, args.metadata)
    except KeyboardInterrupt:
        bars.close()
        print("interrupted: no image was written", file=sys.stderr)
        return 130
    except Cancelled:
        bars.close()
        print("cancelled: no image was written", file=sys.stderr)
        return 130
    except (ValueError, ModelNotFound, FileNotFoundError, FileExistsError) as e:
        bars.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p, flush=True)
    if args.verbose:
        for stage, sec in result.timings.items():
            print(f"{STAGES.get(stage, stage):>15}: {sec:8.2f} s", file=sys.stderr)
        print(f"{'peak memory':>15}: {result.peak_memory / 2**30:8.2f} GiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
