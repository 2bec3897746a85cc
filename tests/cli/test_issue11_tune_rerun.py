"""`shapetune tune` rerun on a finished job (issue 11 item 4 leftover): its per-workload line says
why nothing was measured instead of an empty status count ("{}"), and the DB is left as it was."""

from __future__ import annotations

import sqlite3

from click.testing import CliRunner

from shapetune.cli import main

NAME = "linear_m16_n8_k16_f32"


def _tune(db) -> str:
    out = CliRunner().invoke(main, ["tune", "--target", "llvm", "--shape", "m=16,n=8,k=16", "--no-bias",
                                    "--trials", "1", "--batch", "1", "--template", "dlight", "--db", str(db)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    return next(x for x in out.stderr.splitlines() if x.strip().startswith(f"{NAME}:"))


def _rows(p) -> dict[str, int]:
    con = sqlite3.connect(p)
    try:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("records", "baselines")}
    finally:
        con.close()


def test_a_rerun_says_it_measured_nothing_and_leaves_the_db_as_it_was(tmp_path):
    db = tmp_path / "t.db"
    first = _tune(db)
    assert "{'ok': 1}" in first, first
    before = _rows(db)
    assert before == {"records": 1, "baselines": 1}
    again = _tune(db)
    assert _rows(db) == before
    assert "nothing measured: 1/1 trials already in the DB (vendor from run " in again, again
    assert "{}" not in again
