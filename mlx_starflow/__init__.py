"""mlx-starflow: Apple's STARFlow and TarFlow normalizing flows on MLX."""

from .flow import Flow
from .pipeline import Cancelled, GenerateOptions, Pipeline, Result
from .sample import Jacobi, invert, sample, sample_steps
from .weights import convert_starflow, convert_tarflow, load_flow

__all__ = [
    "Pipeline",
    "Result",
    "Cancelled",
    "GenerateOptions",
    "Flow",
    "Jacobi",
    "sample",
    "sample_steps",
    "invert",
    "load_flow",
    "convert_starflow",
    "convert_tarflow",
]
