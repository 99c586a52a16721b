"""How an app embeds the engine: the pipeline stays loaded, generations run on a
worker thread, progress is reported, and the user can cancel.

    python examples/app.py --model demo
"""

import argparse
import sys
import threading
import time

from mlx_starflow import Cancelled, Pipeline
from mlx_starflow.loading.hub import ModelNotFound


class Generator:
    def __init__(self, model):
        self.pipe = Pipeline.from_pretrained(model)  # loaded once, reused for every request
        self.cancel_requested = threading.Event()

    def progress(self, stage, done, total):
        print(f"\r{stage:>8}: {done}/{total}", end="", flush=True)
        return not self.cancel_requested.is_set()  # returning False cancels

    def run(self, prompt, seed):
        self.cancel_requested.clear()
        try:
            result = self.pipe.generate(prompt, seed=seed, progress=self.progress)
        except Cancelled:
            print("\ncancelled; the pipeline is still ready")
            return None
        except ValueError as e:  # a request the model cannot serve (an unknown prompt, ...): say so, keep running
            print(f"\nerror: {e}", file=sys.stderr)
            return None
        print(f"\ndone: {', '.join(f'{k} {v:.2f}s' for k, v in result.timings.items())}")
        return result.images[0]


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description="A resident pipeline serving a cancelled and a finished request.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="demo", help="'demo', a folder, a checkpoint or a Hugging Face repo id")
    p.add_argument("--prompt", default="red circle", help="what to draw")
    a = p.parse_args()

    try:
        app = Generator(a.model)
        app.pipe.check_prompts([a.prompt])  # a prompt the model cannot draw: one message, before any request
    except (ModelNotFound, ValueError, FileNotFoundError) as e:  # the user's to fix: a message, not a traceback
        sys.exit(f"error: {e}")
    # A request the user cancels shortly after starting it...
    worker = threading.Thread(target=app.run, args=(a.prompt, 1))
    worker.start()
    time.sleep(0.05)
    app.cancel_requested.set()
    worker.join()
    # ...and one that runs to the end with the same loaded pipeline.
    image = app.run(a.prompt, 2)
    if image is None:
        sys.exit(1)  # the request failed: its error is printed
    image.save("app_image.png")
    print("wrote app_image.png")
