"""The result store: one SQLite file of runs and their cells.

Four tables for benchmark runs, and two for training runs. ``runs`` holds one row per ``bench run``: its fingerprint, its sweep and a
status. ``rounds`` holds one row per round of the sweep: the seeded order it visited the
cells in and the drift sentinel's reading at its start. ``launches`` holds one row per
launch of a cell (one process), its raw record as JSON. ``cells`` holds the cell record
derived from the cell's launches (``bench.results.records.cell_record``), rewritten as each launch
lands. Every launch is committed the moment it finishes, in WAL mode, so a run killed
half-way keeps every launch that had finished; ``--resume`` picks up from there.
``train_runs`` holds one row per ``bench train`` (its configs, checkpoint directory, status
and summary) and ``train_steps`` its metrics as they were logged (loss, learning rate,
tokens/s, validation loss), so reports can draw the loss curve.

Resume keeps cells that are ``ok`` or ``skipped`` and retries ``failed``, ``timeout`` and
``oom`` ones (a transient failure, a too-tight timeout or a neighbour's memory use should
not be frozen into the results). A retried cell adds a new row; the old attempt stays in
the table, and ``get_run`` returns the latest attempt of each cell.

The store is written by one process (the harness's parent); cell processes report to it.
The schema version is SQLite's ``user_version``, for future migrations.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import json
import math
import secrets
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Iterable

from bench.machine.environment import fingerprint_id as compute_fingerprint_id
from bench.results.records import decode_rate
from bench.results.schema import CELL_FIELDS, FAILED, STAT_KEYS, STATUSES
from bench.spec import cell_id
from model.errors import InputError

DEFAULT_STORE = Path("runs") / "bench.sqlite"
SCHEMA_VERSION = 2  # 2: rounds, launches and training tables

RUN_STATUSES = ("running", "finished", "interrupted", "failed")
RETRY_ON_RESUME = FAILED

# Record fields that hold a statistics dict (STAT_KEYS) and the keys of the parity dict:
# fixed here so CSV columns do not depend on which cells happen to be in a run.
STATS_FIELDS = ("ttft_ms", "tpot_ms")
PARITY_KEYS = ("max_abs_logit_diff", "token_agreement", "steps", "precision", "passed", "basis",
               "tolerance.max_abs_logit_diff", "tolerance.min_token_agreement")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    name TEXT,
    fingerprint_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sweep TEXT NOT NULL,
    sweep_key TEXT NOT NULL,
    status TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    key TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    cell_order TEXT NOT NULL,
    sentinel TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS launches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    key TEXT NOT NULL,
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS train_runs (
    run_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    name TEXT,
    fingerprint_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    config TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    status TEXT NOT NULL,
    finished_at TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS train_steps (
    run_id TEXT NOT NULL REFERENCES train_runs(run_id),
    step INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE INDEX IF NOT EXISTS cells_run ON cells(run_id, key);
CREATE INDEX IF NOT EXISTS launches_run ON launches(run_id, key);
CREATE INDEX IF NOT EXISTS runs_resume ON runs(sweep_key, fingerprint_id);
"""

# The latest attempt of each cell of a run.
_LATEST_CELLS = "SELECT * FROM cells WHERE id IN (SELECT max(id) FROM cells WHERE run_id = ? GROUP BY key) ORDER BY id"


class StoreError(InputError):
    """The store cannot be opened or does not hold what was asked for."""


class UnknownRun(StoreError, LookupError):
    """No run has the requested id."""


def _now() -> datetime:
    return datetime.now().astimezone()


def sweep_key(sweep: dict) -> str:
    """A short hash of a sweep definition: runs with equal keys swept the same cells."""
    canonical = json.dumps(sweep, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _status(record: dict, what: str) -> str:
    status = record.get("status")
    if status not in STATUSES:
        raise ValueError(f"{what} status {status!r} is not one of {', '.join(STATUSES)}")
    return status


def _key_text(cell: dict) -> str:
    return cell_id(cell)


class Store:
    """Runs and cells in one SQLite file (``DEFAULT_STORE`` unless told otherwise)."""

    def __init__(self, path: str | Path = DEFAULT_STORE, read_only: bool = False):
        """Open (or create) the store. ``read_only``: open an existing store for reading only,
        as a viewer that runs beside the writers does (``bench dashboard``): it never creates,
        migrates or locks the file for writing, and each read is its own short transaction."""
        self.path = Path(path)
        self.read_only = read_only
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a bench store file")
        if read_only and not self.path.is_file():
            raise StoreError(f"no bench store at {self.path}: run `bench run` (or pass --store)")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if read_only:
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                          check_same_thread=False)
                self.db.execute("PRAGMA busy_timeout = 2000")  # wait out a writer's checkpoint, never fail on it
            else:
                self.db = sqlite3.connect(self.path)
        except sqlite3.Error as e:  # unwritable directory and the like
            raise StoreError(f"cannot open the bench store {self.path}: {e}") from None
        self.db.row_factory = sqlite3.Row
        try:
            if read_only:
                self._check_version()
            else:
                self._init_schema()
        except sqlite3.DatabaseError as e:  # "file is not a database" and kin
            self.db.close()
            raise StoreError(f"{self.path} is not a readable bench store (SQLite said: {e})") from None
        except StoreError:
            self.db.close()
            raise

    def _check_version(self) -> int:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema version {version}; this bench reads up to "
                             f"{SCHEMA_VERSION}: upgrade bench or use another --store")
        if self.read_only and version == 0:
            raise StoreError(f"{self.path} is not a bench store (no schema version): is it the right --store?")
        return version

    def _init_schema(self) -> None:
        version = self._check_version()
        if version == 0:
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            foreign = tables - {"runs", "cells", "rounds", "launches", "train_runs", "train_steps", "sqlite_sequence"}
            if foreign:
                raise StoreError(f"{self.path} is an SQLite file of something else "
                                 f"(tables {', '.join(sorted(foreign))}), not a bench store")
        self.db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
        self.db.execute("PRAGMA foreign_keys = ON")
        with self.db:
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    # -- writing ---------------------------------------------------------------------------
    def create_run(self, fingerprint: dict, sweep: dict, name: str | None = None) -> str:
        """Start a run; its id reads as its local start time plus a random suffix.

        The run's sweep key (what ``find_resumable`` matches) is ``sweep["sweep_key"]`` when
        the caller put one there, else ``sweep_key(sweep)``.
        """
        key = sweep.get("sweep_key") or sweep_key(sweep)
        return self._insert_run(
            "", "INSERT INTO runs (run_id, created_at, name, fingerprint_id, fingerprint, sweep, sweep_key, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
            lambda run_id, now: (run_id, now, name, compute_fingerprint_id(fingerprint), json.dumps(fingerprint),
                                 json.dumps(sweep), key))

    def _insert_run(self, prefix: str, sql: str, row) -> str:
        """Insert a run row under a fresh id (``prefix`` + local start time + a random suffix)."""
        now = _now()
        for _ in range(16):
            run_id = f"{prefix}{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
            try:
                with self.db:
                    self.db.execute(sql, row(run_id, now.isoformat(timespec="seconds")))
                return run_id
            except sqlite3.IntegrityError:  # the same second and suffix: draw again
                continue
        raise StoreError(f"could not find a free run id for {prefix}{now:%Y%m%d-%H%M%S} in {self.path}")

    def add_cell(self, run_id: str, cell: dict) -> int:
        """Store one finished cell and commit at once; returns its row id."""
        status = _status(cell, "cell")
        self._require_run(run_id)
        with self.db:
            cur = self.db.execute(
                "INSERT INTO cells (run_id, key, status, created_at, record) VALUES (?, ?, ?, ?, ?)",
                (run_id, _key_text(cell), status, _now().isoformat(timespec="seconds"), json.dumps(cell)))
        return int(cur.lastrowid)

    def update_cell(self, row_id: int, cell: dict) -> None:
        """Rewrite a stored cell record (the same attempt, after another launch landed)."""
        status = _status(cell, "cell")
        with self.db:
            cur = self.db.execute("UPDATE cells SET status = ?, record = ? WHERE id = ?",
                                  (status, json.dumps(cell), row_id))
        if cur.rowcount != 1:
            raise StoreError(f"no stored cell with row id {row_id} in {self.path}")

    def add_launch(self, run_id: str, key: str, round_: int, launch: dict) -> int:
        """Store one finished launch (one process of one cell) and commit at once."""
        status = _status(launch, "launch")
        self._require_run(run_id)
        with self.db:
            cur = self.db.execute(
                "INSERT INTO launches (run_id, key, round, status, created_at, record) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, key, round_, status, _now().isoformat(timespec="seconds"), json.dumps(launch)))
        return int(cur.lastrowid)

    def add_round(self, run_id: str, round_: int, order: list[str], sentinel: dict | None) -> None:
        """Record a round: the order it visits the cells in and the sentinel reading at its start."""
        self._require_run(run_id)
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO rounds (run_id, round, started_at, cell_order, sentinel) VALUES (?, ?, ?, ?, ?)",
                (run_id, round_, _now().isoformat(timespec="seconds"), json.dumps(order),
                 None if sentinel is None else json.dumps(sentinel)))

    def rounds(self, run_id: str) -> list[dict]:
        run_id = self.resolve(run_id)
        rows = self.db.execute("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
        return [dict(round=r["round"], started_at=r["started_at"], order=json.loads(r["cell_order"]),
                     sentinel=None if r["sentinel"] is None else json.loads(r["sentinel"])) for r in rows]

    def launches(self, run_id: str) -> list[dict]:
        """Every stored launch of a run, oldest first: key, round, status, record."""
        run_id = self.resolve(run_id)
        rows = self.db.execute("SELECT * FROM launches WHERE run_id = ? ORDER BY id", (run_id,))
        return [dict(id=r["id"], key=r["key"], round=r["round"], status=r["status"],
                     record=json.loads(r["record"])) for r in rows]

    def latest_cells(self, run_id: str) -> dict[str, tuple[int, dict]]:
        """key -> (row id, record) of the latest attempt of each cell of a run."""
        run_id = self.resolve(run_id)
        return {c["key"]: (c["id"], json.loads(c["record"])) for c in self.db.execute(_LATEST_CELLS, (run_id,))}

    def finish_run(self, run_id: str, status: str = "finished") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        self._require_run(run_id)
        with self.db:
            self.db.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
                            (status, _now().isoformat(timespec="seconds"), run_id))

    def reopen_run(self, run_id: str) -> None:
        """Mark a run as running again (``--resume``)."""
        self._require_run(run_id)
        with self.db:
            self.db.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", (run_id,))

    # -- reading ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def snapshot(self):
        """Reads inside see one state of the store, however many queries they take: one read
        transaction, ended on leaving the block (keep it short: a writer's checkpoint waits for it)."""
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("ROLLBACK")  # nothing was written: ending the read is all it does

    def change_marker(self) -> tuple:
        """A value that changes whenever anything is written: a watcher polls it (cheap, indexed
        reads) and re-reads the store only when it moved."""
        row = self.db.execute("""
            SELECT (SELECT max(id) FROM launches), (SELECT max(id) FROM cells), (SELECT count(*) FROM cells),
                   (SELECT group_concat(run_id || status, ',') FROM runs),
                   (SELECT count(*) FROM train_steps), (SELECT max(rowid) FROM train_steps),
                   (SELECT group_concat(run_id || status, ',') FROM train_runs)""").fetchone()
        return tuple(row)

    def list_training_runs(self) -> list[dict]:
        """Every training run, newest first, with its step count and last logged metrics."""
        rows = self.db.execute("""
            SELECT t.run_id, t.created_at, t.name, t.out_dir, t.status, t.fingerprint_id,
                   (SELECT count(*) FROM train_steps s WHERE s.run_id = t.run_id) AS n_steps,
                   (SELECT record FROM train_steps s WHERE s.run_id = t.run_id ORDER BY step DESC LIMIT 1) AS last
            FROM train_runs t ORDER BY t.created_at DESC, t.rowid DESC""").fetchall()
        return [dict(run_id=r["run_id"], created_at=r["created_at"], name=r["name"], out_dir=r["out_dir"],
                     status=r["status"], fingerprint_id=r["fingerprint_id"], n_steps=r["n_steps"],
                     last=None if r["last"] is None else json.loads(r["last"])) for r in rows]

    def latest_run_id(self) -> str | None:
        row = self.db.execute("SELECT run_id FROM runs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchone()
        return None if row is None else row["run_id"]

    def resolve(self, run_id: str) -> str:
        """``run_id`` itself if it exists, or the newest run for "latest"; UnknownRun otherwise."""
        if run_id == "latest":
            latest = self.latest_run_id()
            if latest is None:
                raise UnknownRun(f"no runs in {self.path} yet: 'latest' names nothing")
            return latest
        self._require_run(run_id)
        return run_id

    def _require_run(self, run_id: str) -> None:
        if self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None:
            return
        ids = [r["run_id"] for r in self.db.execute("SELECT run_id FROM runs ORDER BY created_at DESC")]
        if not ids:
            raise UnknownRun(f"unknown run id {run_id!r}: {self.path} holds no runs yet")
        nearby = difflib.get_close_matches(run_id, ids, n=5, cutoff=0.5) or ids[:5]
        raise UnknownRun(f"unknown run id {run_id!r} in {self.path}; nearby runs: {', '.join(nearby)}")

    def list_runs(self) -> list[dict]:
        """Every run, newest first, with counts of its (latest) cells."""
        rows = self.db.execute("""
            SELECT r.run_id, r.created_at, r.name, r.fingerprint_id, r.status,
                   count(c.id) AS n_cells, coalesce(sum(c.status = 'ok'), 0) AS n_ok
            FROM runs r LEFT JOIN cells c ON c.run_id = r.run_id
                 AND c.id IN (SELECT max(id) FROM cells GROUP BY run_id, key)
            GROUP BY r.run_id ORDER BY r.created_at DESC, r.rowid DESC""").fetchall()
        return [dict(run_id=r["run_id"], created_at=r["created_at"], name=r["name"], n_cells=r["n_cells"],
                     n_ok=r["n_ok"], fingerprint_id=r["fingerprint_id"], status=r["status"]) for r in rows]

    def with_training(self, run: dict) -> dict:
        """The run with ``training``: the latest finished training run of each checkpoint its cells
        measured, so a report can show how the model it benchmarks was trained (its loss curve)."""
        dirs = sorted({c["model"] for c in run["cells"] if Path(str(c.get("model"))).is_absolute()})
        found = []
        for d in dirs:
            ids = self.training_runs_for(d, status="finished")
            if ids:
                found.append(self.get_training_run(ids[0]))
        return dict(run, training=found)

    def get_run(self, run_id: str) -> dict:
        """The run and the latest attempt of each of its cells, in the order they finished."""
        run_id = self.resolve(run_id)
        r = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        cells = [json.loads(c["record"]) for c in self.db.execute(_LATEST_CELLS, (run_id,))]
        for c in cells:
            c.setdefault("cell_id", cell_id(c))  # records stored before schema 2 lack it
            if "decode_tok_s_ci" not in c:  # nor did records before the rate's interval was stored
                c["decode_tok_s_ci"] = decode_rate(c.get("tpot_ms"), c.get("batch"))[1]
        return dict(run_id=r["run_id"], created_at=r["created_at"], name=r["name"], status=r["status"],
                    finished_at=r["finished_at"], fingerprint_id=r["fingerprint_id"],
                    fingerprint=json.loads(r["fingerprint"]), sweep=json.loads(r["sweep"]),
                    sweep_key=r["sweep_key"], rounds=self.rounds(run_id), cells=cells)

    def find_resumable(self, sweep_key: str, fingerprint_id: str) -> str | None:
        """The newest run of the same sweep on the same fingerprint, finished or not."""
        row = self.db.execute(
            "SELECT run_id FROM runs WHERE sweep_key = ? AND fingerprint_id = ?"
            " ORDER BY created_at DESC, rowid DESC LIMIT 1", (sweep_key, fingerprint_id)).fetchone()
        return None if row is None else row["run_id"]

    def done_keys(self, run_id: str, retry: Iterable[str] = RETRY_ON_RESUME) -> set[str]:
        """Keys (``bench.spec.cell_id``) of the cells whose latest attempt has a status not in
        ``retry``: a resume does not try them again (it may still add launches to ok ones)."""
        run_id = self.resolve(run_id)
        retry = set(retry)
        unknown = retry - set(STATUSES)
        if unknown:
            raise ValueError(f"retry statuses {sorted(unknown)} are not among {', '.join(STATUSES)}")
        return {c["key"] for c in self.db.execute(_LATEST_CELLS, (run_id,)) if c["status"] not in retry}


    # -- training runs ---------------------------------------------------------------------
    def create_training_run(self, fingerprint: dict, config: dict, out_dir: str, name: str | None = None) -> str:
        """Start a training run; its id reads like a benchmark run's, with a ``train-`` prefix."""
        return self._insert_run(
            "train-", "INSERT INTO train_runs (run_id, created_at, name, fingerprint_id, fingerprint, config, out_dir,"
                      " status) VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
            lambda run_id, now: (run_id, now, name, compute_fingerprint_id(fingerprint), json.dumps(fingerprint),
                                 json.dumps(config), str(out_dir)))

    def add_training_step(self, run_id: str, step: int, metrics: dict) -> None:
        """Log one step's metrics, committed at once (a resumed run may log a step again: it replaces)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO train_steps (run_id, step, record) VALUES (?, ?, ?)",
                            (run_id, int(step), json.dumps(metrics)))

    def finish_training_run(self, run_id: str, status: str, summary: dict | None = None) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        with self.db:
            cur = self.db.execute("UPDATE train_runs SET status = ?, finished_at = ?, summary = ? WHERE run_id = ?",
                                  (status, _now().isoformat(timespec="seconds"),
                                   None if summary is None else json.dumps(summary), run_id))
        if cur.rowcount != 1:
            raise UnknownRun(f"unknown training run id {run_id!r} in {self.path}")

    def get_training_run(self, run_id: str = "latest") -> dict:
        """A training run with its logged steps, oldest first."""
        if run_id == "latest":
            row = self.db.execute("SELECT * FROM train_runs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchone()
            if row is None:
                raise UnknownRun(f"no training runs in {self.path} yet: 'latest' names nothing")
        else:
            row = self.db.execute("SELECT * FROM train_runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise UnknownRun(f"unknown training run id {run_id!r} in {self.path}")
        steps = [dict(json.loads(r["record"]), step=r["step"]) for r in self.db.execute(
            "SELECT * FROM train_steps WHERE run_id = ? ORDER BY step", (row["run_id"],))]
        return dict(run_id=row["run_id"], created_at=row["created_at"], name=row["name"],
                    fingerprint_id=row["fingerprint_id"], fingerprint=json.loads(row["fingerprint"]),
                    config=json.loads(row["config"]), out_dir=row["out_dir"], status=row["status"],
                    finished_at=row["finished_at"],
                    summary=None if row["summary"] is None else json.loads(row["summary"]), steps=steps)

    def training_runs_for(self, out_dir: str, status: str | None = None) -> list[str]:
        """Ids of the training runs that wrote a checkpoint directory (with ``status``), newest first."""
        return [r["run_id"] for r in self.db.execute(
            "SELECT run_id FROM train_runs WHERE out_dir = ? AND (? IS NULL OR status = ?)"
            " ORDER BY created_at DESC, rowid DESC", (str(out_dir), status, status))]


# -- export ------------------------------------------------------------------------------------
def _json_safe(value):
    """JSON has no NaN or infinity: write null for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def export_json(run: dict) -> str:
    """The whole run (``Store.get_run``), raw samples included, as strict JSON."""
    return json.dumps(_json_safe(run), indent=2, allow_nan=False) + "\n"


def csv_columns(run: dict) -> list[str]:
    """The CSV header: run id, then ``CELL_FIELDS`` in order with statistics and parity
    flattened; fields not in the schema follow, sorted. Raw samples are left out."""
    columns = ["run_id", "fingerprint_id"]
    for field in CELL_FIELDS:
        if field == "samples":
            continue
        if field in STATS_FIELDS:
            columns += [f"{field}_{k}" for k in STAT_KEYS]
        elif field == "parity":
            columns += [f"parity_{k.replace('.', '_')}" for k in PARITY_KEYS]
        else:
            columns.append(field)
    extra = sorted({k for cell in run.get("cells", []) for k in cell} - set(CELL_FIELDS))
    return columns + extra


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):  # backend_info and the like: one JSON cell
        return json.dumps(value, sort_keys=True)
    return value


def _cell_row(run: dict, cell: dict) -> dict:
    row = {"run_id": run.get("run_id"), "fingerprint_id": run.get("fingerprint_id")}
    for field, value in cell.items():
        if field == "samples":
            continue
        if field in STATS_FIELDS and isinstance(value, dict):
            row.update({f"{field}_{k}": value.get(k) for k in STAT_KEYS})
        elif field == "parity" and isinstance(value, dict):
            for k in PARITY_KEYS:
                outer, _, inner = k.partition(".")
                v = value.get(outer)
                row[f"parity_{k.replace('.', '_')}"] = v.get(inner) if inner and isinstance(v, dict) else v
        else:
            row[field] = value
    return {k: _csv_value(v) for k, v in row.items()}


def export_csv(run: dict) -> str:
    """One row per cell; see ``csv_columns`` for the columns."""
    columns = csv_columns(run)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for cell in run.get("cells", []):
        writer.writerow(_cell_row(run, cell))
    return buf.getvalue()
