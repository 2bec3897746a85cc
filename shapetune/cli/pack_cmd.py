"""`shapetune pack OUT`: the kernels this machine's registry serves, compiled, with the DB subset
they need, into a directory that a machine with TVM's runtime only serves from (kernels.pack).

OUT is a directory, not a .tar.gz: the served modules are dlopened and the DB is opened in place,
so a directory needs no extraction where it is served (tar it to ship it). A kernel that fails to
build refuses the whole pack (one line, nothing written), never a pack serving less than its DB.
"""

from __future__ import annotations

import click

from shapetune import config
from shapetune.db import DBError

TARGETS = {"cpu": "llvm", "cuda": "cuda", "auto": None}


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Tuning DB (default: $SHAPETUNE_DB or the user cache dir).")
@click.option("--target", "target_kind", type=click.Choice(sorted(TARGETS)), default="auto", show_default=True,
              help="The target whose kernels are packed: this machine's CPU (llvm) or GPU; auto: the GPU if "
                   "one is visible.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel builds (default: cores).")
def pack(out, db_path, target_kind, jobs):
    """Write OUT (a new directory): the compiled kernels the registry serves on this machine's target
    (machine code, no CUDA source), their records, vendor baselines and bucket rows as a tuning DB,
    and manifest.json (target key, per kernel its workload, record and sha256). Serve it with
    SHAPETUNE_PACK=OUT or kernels.load_pack(OUT): nothing is compiled there."""
    from kernels.pack import PackError, write_pack

    from shapetune.target import detect

    path = db_path or config.default_db_path()
    try:
        target = detect(TARGETS[target_kind])
        s = write_pack(out, path, target, jobs=jobs)
    except (PackError, DBError, RuntimeError, ValueError) as e:
        raise click.ClickException((str(e).splitlines() or [type(e).__name__])[0]) from None
    except OSError as e:
        raise click.ClickException(f"{e.filename or out}: {e.strerror or e}") from None
    click.echo(f"{s.target.describe()}: {s.kernels} kernels ({s.built} built now), {s.baselines} vendor "
               f"baselines, {s.buckets} bucket rows -> {s.out}")
