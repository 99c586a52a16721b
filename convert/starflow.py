"""Convert a reference STARFlow checkpoint to an MLX model folder.

python convert/starflow.py --checkpoint starflow_3B_t2i_256x256.pth \
    --config starflow_3B_t2i_256x256.yaml --out mlx-starflow-3b [--vae FOLDER] [--dtype bfloat16] [-q] [--force]
"""

import sys

from mlx_starflow.cli.convert import starflow_main

if __name__ == "__main__":
    sys.exit(starflow_main())
