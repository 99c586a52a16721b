"""Convert an apple/ml-tarflow checkpoint to an MLX model folder (architecture read from the weights).

python convert/tarflow.py --checkpoint afhq_model_8_768_8_8_0.07.pth --out mlx-tarflow-afhq
"""

import sys

from mlx_starflow.cli.convert import tarflow_main

if __name__ == "__main__":
    sys.exit(tarflow_main())
