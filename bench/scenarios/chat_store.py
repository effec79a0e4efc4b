"""The chat page's conversations, kept in their own SQLite file beside the store.

``bench serve`` writes them (``/chat``: every message sent and every reply, with its TTFT and
tokens/s) and reads them back (the page's list, a reopened conversation, an export). They are a
separate file (``runs/chats.sqlite`` by default) and not tables of the bench store, because the
store holds measurements that ``bench report`` and ``bench compare`` read and a read-only
dashboard watches; a conversation is neither. WAL mode, as the store, so a reader never blocks
the server's writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from datetime import datetime
from pathlib import Path

from model.errors import InputError

DEFAULT_CHATS = Path("runs") / "chats.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id),
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TEXT NOT NULL,
    stats TEXT
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation_id, id);
"""

TITLE_CHARS = 60


class ChatStoreError(InputError):
    """The conversations file cannot be opened, or holds something else."""


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class ChatStore:
    """Conversations and their messages. One connection shared by the server's threads, behind a lock
    (every operation is one short statement or transaction)."""

    def __init__(self, path: str | Path = DEFAULT_CHATS):
        """Open the file if it exists (a foreign or newer file is refused now); a missing one is created
        by the first conversation, so a server nobody chats with leaves no file behind."""
        self.path = Path(path)
        if self.path.is_dir():
            raise ChatStoreError(f"{self.path} is a directory, not a conversations file")
        self.lock = threading.Lock()
        self.db: sqlite3.Connection | None = None
        if str(path) == ":memory:" or self.path.exists():
            self._open()

    def _open(self) -> sqlite3.Connection:
        if self.db is not None:
            return self.db
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, check_same_thread=False)
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as e:
            raise ChatStoreError(f"cannot open the conversations file {self.path}: {e}") from None
        foreign = tables - {"conversations", "messages", "sqlite_sequence"}
        if foreign or version > SCHEMA_VERSION:
            db.close()
            raise ChatStoreError(f"{self.path} is not a bench conversations file (tables {', '.join(sorted(tables))}, "
                                 f"schema version {version})")
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        with db:
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db = db
        return db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def create(self, model: str, first_message: str) -> str:
        """A new conversation titled by the start of its first message; its id."""
        cid = uuid.uuid4().hex[:12]
        title = " ".join(first_message.split())[:TITLE_CHARS] or "(empty)"
        now = _now()
        with self.lock:
            db = self._open()
            with db:
                db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?)", (cid, title, model, now, now))
        return cid

    def add(self, cid: str, role: str, content: str, stats: dict | None = None) -> int:
        now = _now()
        with self.lock:
            db = self._open()
            with db:
                row = db.execute("INSERT INTO messages (conversation_id, role, content, created_at, stats) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 (cid, role, content, now, json.dumps(stats) if stats is not None else None))
                db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
        return row.lastrowid

    def list(self) -> list[dict]:
        """Every conversation, the latest first, with its message count."""
        with self.lock:
            if self.db is None:
                return []
            rows = self.db.execute(
                "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n_messages "
                "FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC").fetchall()
        return [dict(r) for r in rows]

    def get(self, cid: str) -> dict | None:
        """One conversation and its messages in order (each message's stats a dict or None), or None."""
        with self.lock:
            if self.db is None:
                return None
            head = self.db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone()
            if head is None:
                return None
            rows = self.db.execute("SELECT role, content, created_at, stats FROM messages WHERE conversation_id = ? "
                                   "ORDER BY id", (cid,)).fetchall()
        messages = [dict(r, stats=json.loads(r["stats"]) if r["stats"] else None) for r in rows]
        return dict(head, messages=messages)


def to_markdown(conversation: dict) -> str:
    """A conversation as Markdown: a heading, then each message under its role, replies with their figures."""
    lines = [f"# {conversation['title']}", "",
             f"Model: {conversation['model']} · started {conversation['created_at']}", ""]
    for m in conversation["messages"]:
        lines += [f"## {m['role']}", "", m["content"], ""]
        s = m.get("stats")
        if s:
            lines += [f"*{reply_figures(s)}*", ""]
    return "\n".join(lines)


def reply_figures(stats: dict) -> str:
    """"TTFT 12 ms · 85.0 tokens/s · 40 tokens · length": what the page shows under a reply."""
    parts = []
    if stats.get("ttft_ms") is not None:
        parts.append(f"TTFT {stats['ttft_ms']:.0f} ms")
    if stats.get("tok_s") is not None:
        parts.append(f"{stats['tok_s']:.1f} tokens/s")
    parts.append(f"{stats.get('tokens', 0)} tokens")
    if stats.get("finish_reason"):
        parts.append(str(stats["finish_reason"]))
    return " · ".join(parts)
