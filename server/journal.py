"""The routing journal: every routing decision and breaker transition, in SQLite (WAL).

What is stored: time, kind (``route``, ``breaker``, ``drill``, ``shadow``, ``admin``), request id, endpoint, workload, upstream,
route (``cloud``/``local``, or ``none`` when nobody answered), model, reason, HTTP status, latency, token counts, and
for a breaker transition its old and new state and why. For a local classification, ``provenance``
holds (as JSON) the sha256 of the classifier head, of its examples file and of its red-flag list,
and how many answers were abstentions or raised by a red flag: numbers and hashes only. **Never** prompt or completion text:
the table has no column for it.

Rows come from the ``server.events.EventBus`` (``Journal.consume``, on the event loop) and are queued to one writer thread, which commits
them in batches, at most every 20 ms (one commit per batch keeps the writer off the event
loop's back under load). The database runs in WAL mode with
``synchronous=NORMAL``: a committed row survives ``kill -9`` of the server (the WAL is in the
OS's hands once ``commit`` returns). ``understudy events`` and ``GET /admin/events`` read it
with a separate connection while the server runs.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from server.events import AdminAction, BreakerChanged, DrillFinished, Event, RouteDone, ShadowCompared

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    request_id TEXT,
    endpoint TEXT,
    workload TEXT,
    upstream TEXT,
    route TEXT,
    model TEXT,
    reason TEXT,
    status INTEGER,
    latency_ms REAL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    detail TEXT,
    provenance TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""
COLUMNS = ("ts", "kind", "request_id", "endpoint", "workload", "upstream", "route", "model", "reason", "status",
           "latency_ms", "prompt_tokens", "completion_tokens", "detail", "provenance")
_INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
log = logging.getLogger("understudy.journal")
_STOP = object()
_BATCH_PAUSE_S = 0.02


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=5, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if "provenance" not in columns:  # a journal written before provenance existed
            conn.execute("ALTER TABLE events ADD COLUMN provenance TEXT")
            conn.commit()
    conn.row_factory = sqlite3.Row
    return conn


def read_recent(conn: sqlite3.Connection, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM events" + (" WHERE kind = ?" if kind else "") + " ORDER BY id DESC LIMIT ?"
    args: tuple[Any, ...] = (kind, limit) if kind else (limit,)
    return [dict(row) for row in conn.execute(sql, args)]


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="journal", daemon=True)
        self._thread.start()

    # -- event loop ----------------------------------------------------------------------------
    def consume(self, ev: Event) -> None:
        """The journal's sink on the ``server.events.EventBus``: one row per event, queued."""
        if isinstance(ev, RouteDone):
            self._put((ev.ts, "route", ev.request_id, ev.endpoint, ev.workload, ev.upstream, ev.route, ev.model, ev.reason,
                       ev.status, round(ev.latency_ms, 2), ev.prompt_tokens, ev.completion_tokens, ev.detail, ev.provenance))
        elif isinstance(ev, BreakerChanged):
            self._put((ev.ts, "breaker", None, None, None, ev.upstream, None, None, f"{ev.old}->{ev.new}", None, None, None,
                       None, ev.why, None))
        elif isinstance(ev, DrillFinished):  # the full report is a file next to the journal
            self._put((ev.ts, "drill", ev.drill_id, None, None, None, None, None, ev.verdict, None, None, ev.requests, ev.local,
                       ev.detail, json.dumps({"failed": ev.failed})))
        elif isinstance(ev, ShadowCompared):  # labels and cosines; never any text
            self._put((ev.ts, "shadow", None, None, ev.workload, None, "local", ev.model, ev.outcome, None, None, None, None,
                       ev.numbers, None))
        elif isinstance(ev, AdminAction):
            who = f"key {ev.key_id}" if ev.key_id else "no key (keys are off)"
            self._put((ev.ts, "admin", None, None, None, None, None, None, ev.action, None, None, None, None,
                       f"{who}; {ev.detail}" if ev.detail else who, None))

    def prune(self, older_than_s: float) -> None:
        """Queue the deletion of rows older than ``older_than_s`` (the writer thread runs it)."""
        self._queue.put(("prune", time.time() - older_than_s))

    def _put(self, row: tuple[Any, ...]) -> None:
        self._queue.put(row)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every row queued so far is committed (the drill report reads them back)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def between(self, start: float, end: float, kind: str | None = None) -> list[dict[str, Any]]:
        conn = connect(self.path, readonly=True)
        try:
            sql = "SELECT * FROM events WHERE ts >= ? AND ts <= ?" + (" AND kind = ?" if kind else "") + " ORDER BY id"
            args: tuple[Any, ...] = (start, end, kind) if kind else (start, end)
            return [dict(row) for row in conn.execute(sql, args)]
        finally:
            conn.close()

    def recent(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        conn = connect(self.path, readonly=True)
        try:
            return read_recent(conn, limit, kind)
        finally:
            conn.close()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(10)
        self._conn.close()

    # -- writer thread -------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            waiters: list[threading.Event] = []
            if isinstance(item, threading.Event):
                waiters.append(item)
            rows: list[Any] = [] if item is _STOP or waiters else [item]
            stop = item is _STOP
            while len(rows) < 500:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if isinstance(nxt, threading.Event):
                    waiters.append(nxt)
                    continue
                rows.append(nxt)
            prunes = [r for r in rows if r[0] == "prune"]
            rows = [r for r in rows if r[0] != "prune"]
            for _, cutoff in prunes:
                try:
                    self._conn.execute("DELETE FROM events WHERE ts < ?", (cutoff,))
                    self._conn.commit()
                except sqlite3.Error as exc:
                    log.error("journal: old rows could not be pruned from %s: %s", self.path, exc)
            if rows:
                try:
                    self._conn.executemany(_INSERT, rows)
                    self._conn.commit()
                except sqlite3.Error as exc:  # disk full, locked...: say so, keep serving, keep trying
                    log.error("journal: %d rows could not be written to %s: %s", len(rows), self.path, exc)
                    self._conn.rollback()
            for waiter in waiters:
                waiter.set()
            if stop:
                return
            time.sleep(_BATCH_PAUSE_S)  # let rows accumulate: one commit per batch, not per request
