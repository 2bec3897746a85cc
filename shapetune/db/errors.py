"""The one error the tuning DB raises: `DBError`."""

from __future__ import annotations


class DBError(RuntimeError):
    """The DB file is unusable (corrupt, another schema version) or an import file is malformed."""
