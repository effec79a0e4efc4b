"""``bench serve``: an OpenAI-compatible completions server over any backend, batching continuously.

The server is a scenario of the harness: it drives one ``backends.base.Backend`` through the
same verbs the sweep does (prefill, decode, reorder_cache) and reuses the generation code's
pieces (``model.generate``: left padding, sampling, the per-request ``torch.Generator``).

Engine (``bench.scenarios.engine``): one thread owns the backend, so torch work never runs on the event loop. Requests wait
in a bounded queue (full: HTTP 429). At every decode-step boundary the engine admits waiting
requests: it prefills them together (left-padded, with their mask and positions) and joins
their cache to the running batch's along the batch axis, the shorter past padded on the left
(``Backend.join_caches``); the mask, one row per sequence, hides every padded position, and
each sequence carries its own next position, so a row computes exactly what it would alone.
Sequences that finish (a stop token or string, ``max_tokens``, a timeout, a client that went
away) leave the batch by ``reorder_cache``; positions that every remaining row masks are
trimmed (``Backend.trim_cache``), so a batch that never empties does not grow without bound.
A backend whose cache cannot be joined (``supports_join`` false: the graph runtimes keep it in
their own buffers) batches statically instead: a new batch starts when the last one has
finished. ``/health`` and the load results say which ("batching": "continuous" | "static").

HTTP (FastAPI on uvicorn): ``POST /v1/completions`` takes OpenAI's completions request (a text
prompt or token ids; max_tokens, temperature, top_p, top_k, seed, stop, stream) and answers in
OpenAI's shape, streaming by server-sent events; each choice also carries its ``token_ids``.
Bad requests get a 4xx with a one-line reason in OpenAI's error shape. ``GET /health`` says
what is served; ``GET /metrics`` is Prometheus text (queue depth, running sequences, tokens
generated, TTFT/TPOT/latency histograms). Shutting down stops accepting and drains: running
and queued requests finish before the engine stops. ``/v1/chat/completions`` and the ``/chat``
page (``bench.scenarios.chat``) generate through the same ``start`` as completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
import uuid
from typing import Callable

import torch

from bench.scenarios.engine import (DEFAULT_MAX_BATCH, DEFAULT_QUEUE_SIZE, DEFAULT_TIMEOUT_S, Engine, Metrics, QueueFull,
                                    Sequence, ServeError, ShuttingDown)
from bench.scenarios.openai_api import (Generation, Refused, StreamOptions, TextStream, error_response, sse_event,
                                        validation_message, check_sampling)

# -- the HTTP API ----------------------------------------------------------------------------------


from fastapi import Request  # noqa: E402  (module level: FastAPI reads the handlers' annotations from here)
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr  # noqa: E402


class CompletionRequest(BaseModel):
    """OpenAI's completions request. Types are strict (a string is not a number); OpenAI refuses
    arguments it does not know ("Unrecognized request argument supplied"), and so does this."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | list[StrictInt]
    max_tokens: StrictInt | None = 16  # OpenAI's default
    temperature: StrictInt | StrictFloat = 1.0
    top_p: StrictInt | StrictFloat = 1.0
    top_k: StrictInt | None = None  # an extension, as in vLLM; None or -1: off
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False  # an extension, as in vLLM: generate max_tokens whatever comes
    stop_token_ids: list[StrictInt] = Field(default_factory=list)  # an extension, as in vLLM
    n: StrictInt = 1
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    presence_penalty: StrictInt | StrictFloat = 0.0
    frequency_penalty: StrictInt | StrictFloat = 0.0
    user: StrictStr | None = None


def create_app(engine: Engine, tokenizer, *, model_name: str, info: dict, timeout_s: float = DEFAULT_TIMEOUT_S,
               vocab_size: int | None = None, eos_token_id: int | None = None, chat_template=None, chats=None):
    """The FastAPI app over a (not yet started) engine; its lifespan starts the engine and drains it.
    Chat (``bench.scenarios.chat``) renders messages with ``chat_template`` (default: its plain one) and
    keeps the page's conversations in ``chats`` (a ``bench.scenarios.chat_store.ChatStore``; default: in memory)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response, StreamingResponse
    from starlette.exceptions import HTTPException

    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:  # uvicorn has let the open requests finish; the engine drains what is left
            await asyncio.to_thread(engine.stop, True, timeout_s)

    app = FastAPI(title="bench serve", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error_response(exc.status_code, exc.detail, kind="not_found" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/health")
    async def health():
        return dict(info, status="ok", batching=engine.batching, max_batch=engine.max_batch,
                    queue_size=engine.queue_size, queue_depth=engine.queue_depth, running=engine.running,
                    peak_running=engine.peak_running, decode_steps=engine.steps, block_size=engine.block_size, vocab_size=vocab_size, timeout_s=timeout_s, model=model_name)

    @app.get("/metrics")
    async def metrics():
        body, kind = engine.metrics.text()
        return Response(body, media_type=kind)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "bench"}]}

    def start(prompt: list[int], body, *, what: str) -> Generation:
        """Check a tokenised prompt against the model and submit its generation to the engine.
        ``body`` holds the sampling settings (a completions or chat request); ``what`` names the
        prompt in error messages ("prompt", or "conversation" for a chat). Raises ``Refused``."""
        if not prompt:
            raise Refused(400, f"the {what} is empty: give at least one token", param=what)
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise Refused(400, f"{what} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", param=what)
        max_tokens = body.max_tokens
        if max_tokens is None:  # OpenAI's null: as much as the context holds
            max_tokens = max(1, engine.block_size - len(prompt))
        if len(prompt) + max_tokens > engine.block_size:
            raise Refused(400, f"this model's maximum context length is {engine.block_size} tokens; the {what} "
                               f"has {len(prompt)} and max_tokens is {max_tokens}", param="max_tokens" if what == "prompt" else what)
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        text = TextStream(tokenizer, stops)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        stop_ids = set(body.stop_token_ids)
        if eos_token_id is not None and not body.ignore_eos:
            stop_ids.add(eos_token_id)
        greedy = body.temperature == 0  # temperature 0 is greedy, as OpenAI and vLLM read it
        seq = Sequence(
            prompt=prompt, max_tokens=max_tokens, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            greedy=greedy, temperature=float(body.temperature), top_p=float(body.top_p),
            top_k=None if body.top_k in (None, -1) else body.top_k, seed=body.seed,
            stop_token_ids=frozenset(stop_ids),
            stop_check=(lambda toks: text.stop_at(tokenizer.decode(toks)) is not None) if stops else None,
            timeout_s=timeout_s)
        try:
            engine.submit(seq)
        except ShuttingDown as e:
            raise Refused(503, str(e), kind="service_unavailable") from None
        except QueueFull as e:
            raise Refused(429, f"{e}; try again later", kind="rate_limit_exceeded") from None
        return Generation(seq, events, text, prompt)

    app.state.start = start  # the chat endpoints (bench.scenarios.chat) generate through it too

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model not in (model_name, model_name.rstrip("/").rsplit("/", 1)[-1]):
            return error_response(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                          param="model")
        problem = check_sampling(body)
        if problem:
            return error_response(400, problem[0], param=problem[1])
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        try:
            gen = start(prompt, body, what="prompt")
        except Refused as e:
            return e.response()
        seq, events, text = gen.seq, gen.events, gen.text
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: str, tokens: list[int], finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish,
                                 "token_ids": tokens}]}

        def usage() -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": len(seq.tokens),
                    "total_tokens": len(prompt) + len(seq.tokens)}

        if body.stream:
            async def sse():
                got: list[int] = []  # the engine may be steps ahead of what this stream has sent
                try:
                    while True:
                        ev = await events.get()
                        if ev[0] == "token":
                            got.append(ev[1])
                            yield sse_event(chunk(text.delta(got, final=False), [ev[1]], None))
                        elif ev[0] == "done":
                            yield sse_event(chunk(text.delta(got, final=True), [], ev[1]))
                            if body.stream_options and body.stream_options.include_usage:
                                yield sse_event({"id": rid, "object": "text_completion", "created": created,
                                            "model": model_name, "choices": [], "usage": usage()})
                            break
                        else:
                            yield sse_event({"error": {"message": ev[2], "type": ev[1], "param": None, "code": None}})
                            break
                    yield "data: [DONE]\n\n"
                finally:  # the client went away, or we are done: either way the slot is free
                    seq.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream")

        while True:
            try:
                ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    seq.cancel()
                    return Response(status_code=499)  # nobody is listening; the slot is freed
                continue
            if ev[0] == "done":
                out = chunk(text.delta(seq.tokens, final=True), list(seq.tokens), ev[1])
                out["usage"] = usage()
                return out
            if ev[0] == "error":
                status = {"timeout": 504, "shutdown": 503}.get(ev[1], 500)
                return error_response(status, ev[2], kind=ev[1])

    from bench.scenarios.chat import add_chat
    add_chat(app, start=start, tokenizer=tokenizer, model_name=model_name, block_size=engine.block_size,
             template=chat_template, chats=chats)
    return app


# -- running it ------------------------------------------------------------------------------------


def build(backend_name: str, *, precision: str | None = None, model: str | None = None,
          checkpoint: str | None = None, threads: int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
          queue_size: int = DEFAULT_QUEUE_SIZE, timeout_s: float = DEFAULT_TIMEOUT_S, weights_seed: int = 0,
          chats_path: str | None = None):
    """The app for a backend and a preset or checkpoint, the model loaded (``bench serve``'s work).
    ``chats_path``: the chat page's conversations file (default ``runs/chats.sqlite``)."""
    from pathlib import Path

    from backends import registry
    from backends.base import BackendUnavailable
    from bench.scenarios.chat_store import DEFAULT_CHATS, ChatStore
    from bench.models import describe, open_model
    from bench.scenarios.chat import ChatTemplate, ChatTemplateError
    from model.tokenizer import load_tokenizer

    if (model is None) == (checkpoint is None):
        raise ServeError("give exactly one of --model PRESET or --checkpoint DIR")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ServeError(f"timeout={timeout_s} must be a positive number of seconds")
    cls = registry.get_backend_class(backend_name)
    probe = registry.probe(backend_name)
    if not probe.available:
        raise BackendUnavailable(f"backend {backend_name!r} is unavailable: {probe.reason}"
                                 + (f" (fix: {probe.fix})" if probe.fix else ""))
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise ServeError(f"checkpoint directory {checkpoint!r} does not exist")
        name = str(Path(checkpoint).resolve())
    else:
        name = model
    # a preset's random weights, a checkpoint's, or a quantised checkpoint as it is (for its backend only)
    gpt = open_model(checkpoint or model, backend_name, precision, checkpoint=checkpoint is not None,
                     seed=weights_seed)
    if threads:
        torch.set_num_threads(threads)
    backend = cls(precision=precision, threads=threads)
    backend.load(gpt)
    # Warm up (the first calls pay one-time costs: allocation, JIT, graph optimisation) on both
    # paths the engine takes, unpadded and padded, so the first requests measure serving.
    from model.generate import generate
    generate(backend, [[0] * 8, [0] * 4], 4)
    generate(backend, [[0] * 8], 4)
    tokenizer = load_tokenizer(checkpoint, gpt.config.vocab_size)
    try:
        template = ChatTemplate.for_checkpoint(checkpoint, tokenizer)
    except ChatTemplateError as e:
        raise ServeError(str(e)) from None
    chats = ChatStore(chats_path or DEFAULT_CHATS)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    engine = Engine(backend, block_size=gpt.config.block_size, max_batch=max_batch, queue_size=queue_size,
                    pad_token_id=pad, metrics=Metrics())
    info = dict(backend=backend.name, precision=backend.precision, device=backend.device, threads=threads,
                checkpoint=checkpoint is not None, n_params=gpt.config.n_params, model_shape=describe(gpt.config),
                tokenizer=type(tokenizer).__name__)
    return create_app(engine, tokenizer, model_name=name, info=info, timeout_s=timeout_s,
                      vocab_size=gpt.config.vocab_size, eos_token_id=tokenizer.eos_token_id,
                      chat_template=template, chats=chats)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); bound before the server starts, so no race for it."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def uvicorn_server(app, *, drain_s: float = DEFAULT_TIMEOUT_S, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_s, lifespan="on",
                            access_log=False)  # a line per request would swamp a load run
    return uvicorn.Server(config)


@contextlib.contextmanager
def serving_in_thread(app, host: str = "127.0.0.1", port: int = 0, drain_s: float = 30.0, start_s: float = 60.0):
    """Run the app on uvicorn in a thread; yields (server, base URL). Leaving shuts it down gracefully."""
    sock = bind(host, port)
    server = uvicorn_server(app, drain_s=drain_s)
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), name="bench-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield server, f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(drain_s + 30)
        sock.close()


def serve(backend: str, *, host: str = "127.0.0.1", port: int = 8000, drain_s: float = 30.0,
          announce: Callable[[str], None] = print, **kwargs) -> None:
    """``bench serve``: build, listen, serve until interrupted, then drain."""
    app = build(backend, **kwargs)
    sock = bind(host, port)
    base = f"http://{host}:{sock.getsockname()[1]}"
    announce(f"serving on {base} (POST /v1/completions, /v1/chat/completions; GET /health, /metrics; "
             f"the chat page: {base}/chat)")
    uvicorn_server(app, drain_s=drain_s, log_level="info").run(sockets=[sock])

