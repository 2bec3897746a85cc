"""`shapetune`, the command line: the roof of the stack, the one package that may import every floor
(shapetune < cost_model < scheduler < kernels; tests/test_layers.py). Nothing below imports it.

    shapetune tune ...        tune_cmd.py: workloads -> measured, verified records in the DB
    shapetune prebuild        tune_cmd.py: compile what the registry would dispatch, into the kernel cache
    shapetune pack OUT        pack_cmd.py: the served kernels and their DB subset, for runtime-only TVM
    shapetune db ...          db_cmd.py: query, explain, import/export, prune, diff, verify the tuning DB
    shapetune doctor          doctor_cmd.py: versions, GPU, target, DB and caches of this machine
"""

from __future__ import annotations

import click

from .db_cmd import db
from .doctor_cmd import doctor
from .pack_cmd import pack
from .tune_cmd import OPS, PRESETS, SD15_PRESETS, prebuild, tune

__all__ = ["OPS", "PRESETS", "SD15_PRESETS", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shapetune", message="%(version)s")
def main():
    """Auto-scheduled, shape-bucketed kernels for PyTorch, tuned with Apache TVM."""


main.add_command(tune)
main.add_command(prebuild)
main.add_command(pack)
main.add_command(db)
main.add_command(doctor)
