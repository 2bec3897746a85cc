"""Tuned kernels exposed as PyTorch custom ops (torch.ops.shapetune.*).

>>> import kernels
>>> y = kernels.linear(x, w, b)          # torch.ops.shapetune.linear
>>> kernels.fallback_summary()           # how many calls ran tuned vs fell back, and why
>>> kernels.load_pack("sd15-pack")       # serve `shapetune pack`'s kernels, no compiler needed
>>> report = kernels.optimize(pipe)      # a whole diffusers pipeline: patched, channels_last, CUDA graphs
"""

from .attention import attention
from .conv import conv2d
from .fused import geglu, linear_gelu, linear_residual
from .linear import linear
from .norm import add_layer_norm, group_norm, layer_norm
from .pack import load_pack
from .patch import patch, unpatch
from .pipeline import OptimizeReport, optimize, restore
from .registry import Registry, fallback_summary, get_registry, set_registry

__all__ = ["OptimizeReport", "Registry", "add_layer_norm", "attention", "conv2d", "fallback_summary", "geglu",
           "get_registry", "group_norm", "layer_norm", "linear", "linear_gelu", "linear_residual", "load_pack", "optimize",
           "patch", "restore", "set_registry", "unpatch"]
