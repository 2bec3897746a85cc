"""Serving never fails because of the DB (issue 11 item 1): with the registry pointed at a truncated,
garbage-filled, non-SQLite, foreign-SQLite, newer-schema or directory path, every op call runs torch's
path (the same values), counted as ("op", "db_unreadable"), with one warning for the registry."""

from __future__ import annotations

import logging
import sqlite3

import pytest
import torch

import kernels
from shapetune.db import TuningDB
from shapetune.db.schema import SCHEMA_VERSION
from shapetune.target import detect


def _valid(p):
    with TuningDB(p):
        pass
    c = sqlite3.connect(p)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


def _truncated(p):
    _valid(p)
    data = p.read_bytes()
    p.write_bytes(data[:100] + b"\xff" * (len(data) - 100))


def _garbage(p):
    p.write_bytes(bytes(range(256)) * 64)


def _text(p):
    p.write_text("this is not a sqlite file at all\n" * 100)


def _foreign(p):
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()


def _newer(p):
    _valid(p)
    c = sqlite3.connect(p)
    c.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    c.commit()
    c.close()


def _directory(p):
    p.mkdir()


@pytest.mark.parametrize("make", [_truncated, _garbage, _text, _foreign, _newer, _directory])
def test_a_bad_db_falls_back_counted_with_one_warning(make, tmp_path, caplog):
    path = tmp_path / "bad.db"
    make(path)
    prev = kernels.set_registry(kernels.Registry(db_path=path, target=detect("llvm")))
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 16), (8, 16), (8,)))
        xg = torch.randn(2, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
        gw, gb = torch.randn(8, generator=g), torch.randn(8, generator=g)
        with caplog.at_level(logging.WARNING, logger="kernels.registry"):
            for m in (5, 7):  # two signatures: one warning
                torch.testing.assert_close(kernels.linear(x[:m % 5 or 5], w, b),
                                           torch.nn.functional.linear(x[:m % 5 or 5], w, b))
            torch.testing.assert_close(kernels.layer_norm(x, gw.repeat(2), gb.repeat(2), 1e-5),
                                       torch.nn.functional.layer_norm(x, (16,), gw.repeat(2), gb.repeat(2), 1e-5))
            torch.testing.assert_close(kernels.group_norm(xg, 4, gw, gb, 1e-5),
                                       torch.nn.functional.group_norm(xg, 4, gw, gb, 1e-5))
        s = kernels.fallback_summary()
        assert s["linear"] == {"db_unreadable": 2} and s["layer_norm"] == {"db_unreadable": 1}, s
        assert s["group_norm"] == {"db_unreadable": 1}, s
        warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
    finally:
        kernels.set_registry(prev)
