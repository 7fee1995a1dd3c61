"""The content-addressed verdict cache: one sqlite3 file, key -> TurnVerdict JSON.

The key (`editrl.judges.base.cache_key`) hashes everything a verdict depends on: the images,
the session's text, the turn, the judge id, prompt version and sampling parameters. So a
re-run of the same editor outputs under the same judge settings costs no judge call, in any
output folder. Only verdicts without a judge error are stored: a transient failure (timeout,
unparseable reply) is retried next time instead of being remembered.

The file is opened in WAL mode, so several benchmark runs may share it; writes are batched,
one transaction per chunk.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Sequence

from ..session import EditrlInputError, TurnVerdict

_SCHEMA = """CREATE TABLE IF NOT EXISTS verdicts (
    key TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    verdict TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID"""
_LOOKUP_BATCH = 500  # sqlite's default limit on bound parameters is 999 (older builds)


def default_cache_path() -> Path:
    """$EDITRL_CACHE_DIR/judgements.sqlite, else ~/.cache/editrl/judgements.sqlite."""
    root = os.environ.get("EDITRL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "editrl") / "judgements.sqlite"


class VerdictCache:
    """key -> TurnVerdict, persisted in sqlite (WAL)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(_SCHEMA)
        except (sqlite3.DatabaseError, OSError) as e:
            raise EditrlInputError(f"--cache {self.path}: cannot use it as a verdict cache ({e})") from None

    def get_many(self, keys: Sequence[str]) -> dict[str, TurnVerdict]:
        """The cached verdicts among `keys` (misses are absent)."""
        found: dict[str, TurnVerdict] = {}
        for i in range(0, len(keys), _LOOKUP_BATCH):
            part = list(keys[i:i + _LOOKUP_BATCH])
            q = f"SELECT key, verdict FROM verdicts WHERE key IN ({','.join('?' * len(part))})"
            for key, text in self.db.execute(q, part):
                found[key] = TurnVerdict.model_validate_json(text)
        return found

    def put_many(self, items: Iterable[tuple[str, TurnVerdict]], judge_id: str) -> int:
        """Store verdicts that carry no judge error, in one transaction; returns how many."""
        return self.put_texts(((k, v.model_dump_json()) for k, v in items if not v.has_error), judge_id)

    def put_texts(self, items: Iterable[tuple[str, str]], judge_id: str) -> int:
        """Store already serialized verdicts (`TurnVerdict.model_dump_json()` of verdicts
        without a judge error), in one transaction; returns how many."""
        now = time.time()
        rows = [(k, judge_id, text, now) for k, text in items]
        if rows:
            with self.db:  # BEGIN ... COMMIT
                self.db.execute("BEGIN")
                self.db.executemany("INSERT OR REPLACE INTO verdicts (key, judge, verdict, created) VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        self.db.close()


class NoCache:
    """`--no-cache`: every lookup misses and nothing is stored."""

    path = None

    def get_many(self, keys: Sequence[str]) -> dict[str, TurnVerdict]:
        return {}

    def put_many(self, items: Iterable[tuple[str, TurnVerdict]], judge_id: str) -> int:
        return 0

    def put_texts(self, items: Iterable[tuple[str, str]], judge_id: str) -> int:
        return 0

    def close(self) -> None:
        pass
