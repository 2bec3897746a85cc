"""The tuning DB: append-only history of measurements and vendor baselines in one SQLite file.

`store` (TuningDB: connection, transactions, appends, queries, trust), `codec` (export lines and
JSONL files, usable without a DB), `schema` (tables, views, version, migrations), `errors`.

Several processes may append at once (WAL, a 30 s busy timeout, and every write in one
``BEGIN IMMEDIATE`` transaction). Nothing is ever updated or deleted; "the best schedule" is a
query over the history (the ``best`` view).

Trust. Every record and baseline stores the sha256 of its export line (`line_sha256`) and its
origin: "measured" (by a tuner writing into this DB, or a shard DB of this job merged with
`merge_from`) or "imported" (a line of a JSONL export: a claim made elsewhere). Only measured
records are served (`best`, `best_all`). An imported record is re-verified on this target once
(scheduler.reverify: `shapetune db verify`, and `Registry.prebuild`): the verdict is appended to
the ``reverifications`` table and a record that passes is appended again, as measured here with
the latency measured here. A record's trust state (`trust`): measured | imported (pending) |
reverified | reverify_failed (with the reason).
"""

from .codec import baseline_to_json, from_json_line, line_sha256, record_to_json
from .errors import DBError
from .frame import to_dataframe
from .schema import SCHEMA_VERSION
from .store import BUSY_TIMEOUT_S, TuningDB  # noqa: F401 (importable as before)

__all__ = ["SCHEMA_VERSION", "DBError", "TuningDB", "record_to_json",
           "baseline_to_json", "from_json_line", "line_sha256", "to_dataframe"]
