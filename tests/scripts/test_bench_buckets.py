"""scripts/bench_buckets.py's shape lists: every family the registry buckets has one, and each shape (GPU
and CPU lists) lies in a bucket without being its representative, so the efficiency it reports is measured
off the shape the bucket kernel was scored at."""

from __future__ import annotations

import pytest

from shapetune.buckets import DEFAULT
from tests._scripts import script

bb = script("bench_buckets")


def test_every_bucketed_family_has_shapes():
    assert {op for op, _ in DEFAULT.dims} <= set(bb.FAMILIES)


@pytest.mark.parametrize("family", sorted(bb.FAMILIES))
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_shapes_are_off_their_buckets_representative(family, gpu):
    shapes = bb.FAMILIES[family][0 if gpu else 1]("float16" if gpu else "float32")
    assert shapes and len(set(shapes)) == len(shapes)
    for s in shapes:
        assert s.op == family and not s.dynamic
        b = DEFAULT.bucket_of(s)
        assert b is not None and b.covers(s), s.name
        assert b.dims != s.dims, f"{s.name} is its bucket's representative"
