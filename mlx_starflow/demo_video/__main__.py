"""python -m mlx_starflow.demo_video {train,evaluate,strip}"""

import sys

from . import main

sys.exit(main())
