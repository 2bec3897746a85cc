"""shapetune: auto-scheduled, shape-bucketed GPU kernels for PyTorch, tuned with Apache TVM."""

from .target import Target, detect
from .workload import Workload, linear_workload

__version__ = "0.1.0"
__all__ = ["Target", "Workload", "detect", "linear_workload", "__version__"]
