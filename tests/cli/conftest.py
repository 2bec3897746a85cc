import pytest

from shapetune.db import TuningDB
from tests.shapetune._db_history import history


@pytest.fixture
def path(tmp_path):
    """The shared history (two targets, two workloads, 8 records, 3 baselines) in a DB file."""
    p = tmp_path / "t.db"
    with TuningDB(p) as d:
        rs, bs = history()
        d.add_results(rs)
        for b in bs:
            d.add_baseline(b)
    return str(p)
