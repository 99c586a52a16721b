"""mlx-starflow: Apple's STARFlow and TarFlow normalizing flows on MLX."""

from .flow import Cancelled, Flow, Jacobi
from .pipeline import Pipeline, Result
from .weights import convert_starflow, convert_tarflow, load_flow

__all__ = ["Pipeline", "Result", "Cancelled", "Flow", "Jacobi", "load_flow", "convert_starflow", "convert_tarflow"]
