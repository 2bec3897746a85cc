"""Piped `shapetune db` tables show every cell in full, one row per line (issue 11 item 8 leftover):
through CliRunner stdout is not a terminal, as in `shapetune db list | grep ...`."""

import pytest
from click.testing import CliRunner

from shapetune.cli.db_cmd import db
from shapetune.db import TuningDB
from shapetune.ops.conv import conv2d_workload
from shapetune.records import Candidate, LatencyStats, MeasureResult, VendorBaseline
from tests.shapetune._db_history import CPU

# a conv2d with epilogue bias,residual and its layout parameters in the name, dims big enough that
# the name (126 characters) and `db list`'s other columns overflow a 220-column console
BIG = 10 ** 8
SHAPE = dict(n=BIG, h=BIG, w=BIG, ci=BIG, co=BIG, kh=BIG, kw=BIG, stride=BIG, padding=BIG)
W = conv2d_workload(**SHAPE, dtype="float32", residual=True)
# knobs long enough that a candidate alone is wider than such a console
CAND = Candidate("conv_llvm", tuple((f"knob_{i}_with_a_long_name", 2 ** i) for i in range(10)))


@pytest.fixture
def long_path(tmp_path):
    p = tmp_path / "long.db"
    with TuningDB(p) as d:
        d.add_result(MeasureResult(W, CPU, CAND, "ok", LatencyStats.of([90.0, 100.0, 110.0]),
                                   max_rel_err=1e-5, run_id="run-a", created=1.7e9))
        d.add_baseline(VendorBaseline(W, CPU, "torch.nn.functional.conv2d", LatencyStats.of([120.0, 121.0]),
                                      run_id="run-a", created=1.7e9))
    return str(p)


def _lines_with(out: str, text: str) -> list[str]:
    return [line for line in out.splitlines() if text in line]


@pytest.mark.parametrize("cmd", [["list"], ["records"], ["best"], ["show", "1"]])
def test_a_piped_table_shows_the_long_workload_name_on_one_line(long_path, cmd):
    res = CliRunner().invoke(db, [*cmd, "--db", long_path])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output, res.output
    assert len(_lines_with(res.output, W.name)) == 1, res.output
    if cmd == ["best"]:
        assert len(_lines_with(res.output, str(CAND))) == 1, res.output
    if cmd == ["show", "1"]:
        assert len(_lines_with(res.output, ", ".join(f"{k}={v!r}" for k, v in CAND.knobs))) == 1, res.output


def test_a_piped_field_table_shows_a_long_value_on_one_line(long_path):
    """`db explain`'s field/value table: the served candidate's line is whole, not folded."""
    shape = ",".join(f"{k}={v}" for k, v in SHAPE.items())
    res = CliRunner().invoke(db, ["explain", "conv2d", "--shape", shape + ",residual=1",
                                  "--target", CPU.key, "--db", long_path])
    assert res.exit_code == 0, res.output
    assert len(_lines_with(res.output, str(CAND))) == 1, res.output
