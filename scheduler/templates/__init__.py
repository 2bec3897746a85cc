"""Schedule templates: knob spaces over tir.Schedule, one file per (op family, target kind)."""

from .base import Template, all_templates, current_version, for_workload, get, register

__all__ = ["Template", "all_templates", "current_version", "for_workload", "get", "register"]
