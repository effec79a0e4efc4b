"""The serving engine behind ``bench serve``: one thread owns the backend and batches continuously.

Requests wait in a bounded queue (full: ``QueueFull``, HTTP 429). At every decode-step
boundary the engine admits waiting requests: it prefills them together (left-padded, with
their mask and positions) and joins their cache to the running batch's (``Backend.join_caches``);
finished sequences leave by ``reorder_cache`` and positions every row masks are trimmed
(``Backend.trim_cache``). A backend whose cache cannot be joined batches statically. ``Metrics``
are the server's Prometheus counters and histograms. The HTTP API over it is ``bench.scenarios.serve``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from model.errors import InputError
from model.generate import _left_pad, _sample


DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_SIZE = 64
DEFAULT_TIMEOUT_S = 300.0
IDLE_POLL_S = 0.05  # how long an idle engine waits for a request before looking at its stop flag


class QueueFull(Exception):
    """The engine's queue is full: the server answers 429."""


class ShuttingDown(QueueFull):
    """The server is draining and takes no new requests: 503."""


class ServeError(InputError):
    """A server setting or a request the server cannot serve; the message names the value."""


# -- the engine ------------------------------------------------------------------------------------


@dataclass(eq=False)
class Sequence:
    """One request's generation, shared by the HTTP side and the engine thread.

    ``emit`` is called from the engine thread with ``("token", id)``, then once with
    ``("done", finish_reason)`` or ``("error", kind, message)``; it must be thread-safe.
    ``cancel()`` (a client that went away) makes the engine drop the sequence at its next step.
    """

    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    stop_check: Callable[[list[int]], bool] | None = None  # stop strings: true once the text holds one
    timeout_s: float | None = None
    tokens: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: str | None = None  # the finish reason, once finished
    _cancelled: bool = False

    def __post_init__(self):
        self.generator = None
        if not self.greedy:  # a private generator per request: the same seed gives the same sample
            self.generator = torch.Generator()
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.arrived > self.timeout_s


@dataclass
class _Batch:
    """The running batch: its sequences and their state, one row each."""

    seqs: list[Sequence]
    cache: Any
    mask: torch.Tensor  # (B, S): True where the cache holds a real token of that row
    pos: torch.Tensor  # (B,): each row's next position (its real tokens so far)
    last: torch.Tensor  # (B,): each row's last chosen token, the next decode's input


class Engine:
    """Generation over one loaded backend, in its own thread, with a bounded queue of requests."""

    def __init__(self, backend, *, block_size: int, max_batch: int = DEFAULT_MAX_BATCH,
                 queue_size: int = DEFAULT_QUEUE_SIZE, pad_token_id: int = 0, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ServeError(f"max_batch={max_batch} must be at least 1")
        if queue_size < 1:
            raise ServeError(f"queue_size={queue_size} must be at least 1")
        self.backend = backend
        self.block_size = block_size
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.pad_token_id = pad_token_id
        self.continuous = bool(getattr(backend, "supports_join", False))
        self.metrics = metrics
        self._pending: queue.Queue[Sequence] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._drain = True
        self._thread: threading.Thread | None = None
        self._batch: _Batch | None = None
        self.steps = 0  # decode steps run
        self.peak_running = 0  # the most sequences one step has run together
        self.joins = 0  # prefilled groups joined to a batch already running

    @property
    def batching(self) -> str:
        return "continuous" if self.continuous else "static"

    @property
    def queue_depth(self) -> int:
        return self._pending.qsize()

    @property
    def running(self) -> int:
        batch = self._batch
        return 0 if batch is None else len(batch.seqs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bench-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine: with ``drain``, after every running and queued request has finished."""
        self._drain = drain
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, seq: Sequence) -> None:
        if self._stop.is_set():
            raise ShuttingDown("the server is shutting down")
        try:
            self._pending.put_nowait(seq)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.queue_size} requests waiting)") from None
        self._gauges()

    # -- the loop (engine thread) ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            if self._stop.is_set() and (not self._drain or (self._batch is None and self._pending.empty())):
                break
            new = self._admit()
            if new:
                try:
                    self._prefill(new)
                except Exception as e:  # a failing prefill fails the requests it held, not the running ones
                    self._fail(new, e)
            if self._batch is not None:
                try:
                    self._decode()
                except Exception as e:  # a failing step fails the batch it ran, never the server
                    self._fail(self._batch.seqs, e)
                    self._batch = None
            self._gauges()
            # Let the event loop run between steps: it writes the streamed tokens out, and without
            # a switch here it waits for the interpreter's switch interval, several steps at a time.
            time.sleep(0)
        for s in (self._batch.seqs if self._batch else []):
            if s.finished is None:
                self._finish(s, "error", ("error", "shutdown", "the server stopped before this request finished"))
        while not self._pending.empty():
            self._finish(self._pending.get_nowait(), "error", ("error", "shutdown", "the server stopped"))

    def _fail(self, seqs: list[Sequence], e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        for s in seqs:
            if s.finished is None:
                self._finish(s, "error", ("error", "internal", msg))

    def _admit(self) -> list[Sequence]:
        """Waiting requests that may join now: any, up to the free rows, when batching continuously;
        only into an empty batch when not."""
        batch = self._batch
        if batch is not None and not self.continuous:
            return []
        room = self.max_batch - (0 if batch is None else len(batch.seqs))
        out: list[Sequence] = []
        now = time.perf_counter()
        while len(out) < room:
            try:
                seq = self._pending.get(timeout=IDLE_POLL_S) if batch is None and not out else \
                    self._pending.get_nowait()
            except queue.Empty:
                break
            if self._drop(seq, now):
                continue
            out.append(seq)
        return out

    def _drop(self, seq: Sequence, now: float) -> bool:
        """Finish a cancelled or timed-out sequence; whether it was."""
        if seq.cancelled:
            self._finish(seq, "cancelled", ("done", "cancelled"))
            return True
        if seq.expired(now):
            self._finish(seq, "timeout", ("error", "timeout", f"the request timed out after {seq.timeout_s:g} s"))
            return True
        return False

    def _prefill(self, new: list[Sequence]) -> None:
        ids, mask, pos = _left_pad([s.prompt for s in new], self.pad_token_id)
        logits, cache = self.backend.prefill(ids, pos, mask)
        if mask is None:  # equal lengths took the unmasked path; the batch keeps an explicit mask
            mask = torch.ones(ids.shape, dtype=torch.bool)
        last = self._choose(logits, new)
        group = _Batch(new, cache, mask, mask.sum(1), last)
        if self._batch is None:
            self._batch = group
        else:
            old = self._batch
            self.joins += 1
            S = max(old.mask.shape[1], mask.shape[1])
            self._batch = _Batch(
                old.seqs + new, self.backend.join_caches([old.cache, cache]),
                torch.cat([F.pad(old.mask, (S - old.mask.shape[1], 0), value=False),
                           F.pad(mask, (S - mask.shape[1], 0), value=False)]),  # (B_old + B_new, S)
                torch.cat([old.pos, group.pos]), torch.cat([old.last, last]))
        self._leave()

    def _decode(self) -> None:
        b = self._batch
        mask = torch.cat([b.mask, torch.ones(len(b.seqs), 1, dtype=torch.bool)], dim=1)  # (B, S + 1)
        if bool(mask.all()):  # no padding anywhere: the unmasked fast path, as generate takes it
            logits, cache = self.backend.decode(b.last.unsqueeze(1), b.cache)
        else:
            logits, cache = self.backend.decode(b.last.unsqueeze(1), b.cache, b.pos.unsqueeze(1), mask)
        self.steps += 1
        self.peak_running = max(self.peak_running, len(b.seqs))
        b.cache, b.mask, b.pos = cache, mask, b.pos + 1
        b.last = self._choose(logits, b.seqs)
        self._leave()

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's next token (B,), by its own settings; emits it and finishes what should finish."""
        tok = logits.argmax(-1)  # (B,)
        for i, s in enumerate(seqs):
            if not s.greedy:
                tok[i] = _sample(logits[i:i + 1], s.temperature, s.top_k, s.top_p, s.generator)[0]
        now = time.perf_counter()
        for s, t in zip(seqs, tok.tolist()):
            if s.finished is not None:
                continue
            if s.first_token_at is None:
                s.first_token_at = now
            if t in s.stop_token_ids:  # a stop token ends the text and is not part of it
                self._finish(s, "stop", ("done", "stop"))
                continue
            s.tokens.append(t)
            if self.metrics:
                self.metrics.tokens.inc()
            s.emit(("token", t))
            if s.stop_check is not None and s.stop_check(s.tokens):
                self._finish(s, "stop", ("done", "stop"))
            elif len(s.tokens) >= s.max_tokens:
                self._finish(s, "length", ("done", "length"))
        return tok

    def _leave(self) -> None:
        """Let finished, cancelled and timed-out sequences leave the batch; trim what all rows mask."""
        b = self._batch
        now = time.perf_counter()
        for s in b.seqs:
            if s.finished is None:
                self._drop(s, now)
        keep = [i for i, s in enumerate(b.seqs) if s.finished is None]
        if not keep:
            self._batch = None
            return
        if len(keep) < len(b.seqs):
            idx = torch.tensor(keep, dtype=torch.long)
            b.seqs = [b.seqs[i] for i in keep]
            b.cache = self.backend.reorder_cache(b.cache, idx)
            b.mask, b.pos, b.last = b.mask[idx], b.pos[idx], b.last[idx]
        if self.continuous:
            lead = int((~b.mask.any(0)).int().cumprod(0).sum())  # leading columns no row uses
            if lead:
                b.cache = self.backend.trim_cache(b.cache, b.mask.shape[1] - lead)
                b.mask = b.mask[:, lead:]

    def _finish(self, seq: Sequence, outcome: str, event: tuple) -> None:
        seq.finished = event[1] if event[0] == "done" else outcome
        if self.metrics:
            self.metrics.observe(seq, outcome)
        seq.emit(event)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.queue_depth)
            self.metrics.running.set(self.running)


# -- metrics ---------------------------------------------------------------------------------------


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers in one process)."""

    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("bench_serve_queue_depth", "Requests waiting to join the batch", registry=r)
        self.running = Gauge("bench_serve_running_sequences", "Sequences in the running batch", registry=r)
        self.tokens = Counter("bench_serve_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("bench_serve_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("bench_serve_ttft_seconds", "Time to first token", buckets=self.LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("bench_serve_tpot_seconds", "Time per output token after the first",
                              buckets=self.LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("bench_serve_e2e_latency_seconds", "Request latency, arrival to last token",
                                 buckets=self.LATENCY_BUCKETS, registry=r)

    def observe(self, seq: Sequence, outcome: str) -> None:
        now = time.perf_counter()
        self.requests.labels(outcome=outcome).inc()
        if seq.first_token_at is None:
            return
        ttft = seq.first_token_at - seq.arrived
        self.ttft.observe(ttft)
        self.latency.observe(now - seq.arrived)
        if len(seq.tokens) > 1:
            self.tpot.observe((now - seq.first_token_at) / (len(seq.tokens) - 1))

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
