"""mlx-starflow: Apple's STARFlow and TarFlow normalizing flows on MLX."""

from .loading.weights import convert_starflow, convert_tarflow, load_flow
from .models.flow import Flow
from .options import Cancelled, Event, GenerateOptions, LoadOptions, Result
from .pipeline import Pipeline
from .sample import Jacobi, invert, sample, sample_steps

__all__ = [
    "Pipeline",
    "Result",
    "Event",
    "Cancelled",
    "GenerateOptions",
    "LoadOptions",
    "Flow",
    "Jacobi",
    "sample",
    "sample_steps",
    "invert",
    "load_flow",
    "convert_starflow",
    "convert_tarflow",
]
