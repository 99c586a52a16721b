"""python -m mlx_starflow.demo {train,evaluate,grid}"""

import sys

from . import main

sys.exit(main())
