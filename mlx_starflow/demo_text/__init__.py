"""The text demo: a tiny STARFlow that reads free prompts through a Gemma-architecture LM.

python -m mlx_starflow.demo_text train --out DIR     # the recipe (train.py)
python -m mlx_starflow.demo_text evaluate            # the checker on held-out combinations
"""

from .cli import main

__all__ = ["main"]
