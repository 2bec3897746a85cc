"""shapetune: auto-scheduled, shape-bucketed GPU kernels for PyTorch, tuned with Apache TVM.

The ground floor: values (Workload, Target), op definitions (shapetune.ops), the tuning DB
(shapetune.db), shape buckets and configuration. Importing it loads neither torch nor TVM.
"""

from .target import Target, detect
from .workload import Workload

__version__ = "0.1.0"
__all__ = ["Target", "Workload", "detect", "__version__"]
