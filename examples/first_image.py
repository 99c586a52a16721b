"""The smallest use of the Python API: one prompt, one image.

python examples/first_image.py --model demo --prompt "red circle"           # offline, seconds
python examples/first_image.py --prompt "a film still of a cat playing piano"   # the 3B model
"""

import argparse
import sys

from mlx_starflow import Pipeline
from mlx_starflow.loading.hub import ModelNotFound

p = argparse.ArgumentParser(
    description="Generate one image with the Python API.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
)
p.add_argument("--model", default="apple/starflow", help="'demo', a folder, a checkpoint or a Hugging Face repo id")
p.add_argument("--prompt", default="a film still of a cat playing piano", help="what to draw")
p.add_argument("--seed", type=int, default=0, help="the noise seed")
p.add_argument("--out", default="first_image.png", help="the PNG to write")
a = p.parse_args()

try:
    pipe = Pipeline.from_pretrained(a.model)
    result = pipe.generate(a.prompt, seed=a.seed)
except (ModelNotFound, ValueError, FileNotFoundError) as e:  # the user's to fix: a message, not a traceback
    sys.exit(
        f"error: {e}\nThe bundled demo model works offline: "
        "python examples/first_image.py --model demo --prompt 'red circle'"
    )
result.images[0].save(a.out)
print(f"wrote {a.out} in {sum(result.timings.values()):.1f} s")
