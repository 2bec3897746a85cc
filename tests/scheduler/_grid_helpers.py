"""Shared by the grid tests (test_grid.py, test_grid_sdxl.py)."""

from __future__ import annotations


def summed(*grids) -> tuple[dict, dict]:
    """(calls per bucket, calls per op outside every bucket) of several scheduler.jobs.GridCalls added up:
    what one grid_bucket_calls over all their models gives."""
    calls: dict = {}
    outside: dict = {}
    for g in grids:
        for w, n in g.calls.items():
            calls[w] = calls.get(w, 0) + n
        for op, n in g.outside.items():
            outside[op] = outside.get(op, 0) + n
    return calls, outside
