"""The smallest use of the Python API: one prompt, one image.

    python examples/first_image.py --model demo --prompt "red circle"
    python examples/first_image.py --prompt "a film still of a cat playing piano"   # the 3B model
"""
import argparse

from mlx_starflow import Pipeline

p = argparse.ArgumentParser()
p.add_argument("--model", default="apple/starflow")
p.add_argument("--prompt", default="a film still of a cat playing piano")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="first_image.png")
a = p.parse_args()

pipe = Pipeline.from_pretrained(a.model)
result = pipe.generate(a.prompt, seed=a.seed)
result.images[0].save(a.out)
print(f"wrote {a.out} in {sum(result.timings.values()):.1f} s")
