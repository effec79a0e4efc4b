"""Chat for ``bench serve``: OpenAI's ``/v1/chat/completions`` and the ``/chat`` page.

Both generate through the same engine as ``/v1/completions`` (``create_app``'s ``start``: the
same queue, batching, limits and errors), so what the chat page shows is what ``bench load``
measures.

The messages become one prompt through a chat template, a Jinja template as Hugging Face
writes them: the checkpoint's ``tokenizer_config.json`` ``chat_template`` where it has one
(rendered in Jinja's immutable sandbox, with ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and ``raise_exception``, as ``transformers`` renders it), else
``DEFAULT_TEMPLATE``: one ``role: content`` line per message and then ``assistant:``, which
a byte-tokenised preset and a BPE checkpoint read alike.

The page (``GET /chat``, its script ``bench/scenarios/static/chat.js``) talks over a WebSocket
(``/chat/ws``): it sends a message with its generation options, and the server answers with
the reply's text piece by piece as tokens are generated, then the reply's TTFT (from the
message's arrival to the first token, queue included) and tokens/s (decode: tokens after the
first over the time after the first). Conversations are kept in SQLite (``bench.scenarios.chat_store``) and
served back as JSON for the page's list, and exported as Markdown or JSON. A socket that closes
mid-reply cancels its generation (the slot is freed) and keeps the part already generated.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Request, WebSocket
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from bench.scenarios.chat_store import ChatStore, ChatStoreError, to_markdown
from bench.scenarios.openai_api import Generation, Refused, StreamOptions, error_response, sse_event, check_sampling

# The plain template when a checkpoint declares none: "user: Hello\nassistant:".
DEFAULT_TEMPLATE = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
MAX_MESSAGE_CHARS = 100_000  # a page message longer than this is refused before it is tokenised
STATIC = Path(__file__).with_name("static")  # the page's script (package data)
PAGE_DEFAULTS = dict(temperature=0.8, top_p=0.95, max_tokens=64)


class ChatTemplateError(ValueError):
    """A chat template that does not compile or fails on the messages."""


class ChatTemplate:
    """Messages to prompt text through a sandboxed Jinja template."""

    def __init__(self, source: str | None = None, *, bos_token: str = "", eos_token: str = "", origin: str = "default"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source or DEFAULT_TEMPLATE
        self.origin = origin if source else "default"
        self.specials = dict(bos_token=bos_token, eos_token=eos_token)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        try:
            self.template = env.from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template of {origin} does not compile: {e}") from None

    @staticmethod
    def _raise(message):
        raise ChatTemplateError(str(message))

    @classmethod
    def for_checkpoint(cls, directory: str | Path | None, tokenizer) -> ChatTemplate:
        """The checkpoint's ``tokenizer_config.json`` ``chat_template`` (a string, or Hugging Face's list
        of named templates: the one named "default"), else the default template."""
        config = Path(directory) / "tokenizer_config.json" if directory else None
        if config is None or not config.is_file():
            return cls()
        try:
            declared = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"{config} is not valid JSON: {e}") from None
        source = declared.get("chat_template") if isinstance(declared, dict) else None
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            return cls()

        def token(key):
            value = declared.get(key)
            return value.get("content", "") if isinstance(value, dict) else (value or "")
        return cls(source, bos_token=token("bos_token"), eos_token=token("eos_token"), origin=str(config))

    def render(self, messages: list[dict]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.specials)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None


# -- the API's request ---------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """OpenAI's chat completions request; strict types and no unknown arguments, as completions."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    messages: list[Message]
    max_tokens: StrictInt | None = None  # OpenAI's default for chat: as many as fit
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    temperature: StrictInt | StrictFloat = 1.0
    top_p: StrictInt | StrictFloat = 1.0
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    n: StrictInt = 1
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    presence_penalty: StrictInt | StrictFloat = 0.0
    frequency_penalty: StrictInt | StrictFloat = 0.0
    user: StrictStr | None = None


class PageOptions(BaseModel):
    """The page's generation options (a WebSocket message's ``options``)."""

    model_config = ConfigDict(extra="forbid")
    temperature: StrictInt | StrictFloat = PAGE_DEFAULTS["temperature"]
    top_p: StrictInt | StrictFloat = PAGE_DEFAULTS["top_p"]
    max_tokens: StrictInt = PAGE_DEFAULTS["max_tokens"]
    seed: StrictInt | None = None
    # what start() and check_sampling() read, fixed for the page
    top_k: None = None
    stop: None = None
    stop_token_ids: tuple = ()
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: int = 0
    frequency_penalty: int = 0


class PageMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["send", "stop"]
    conversation: StrictStr | None = None
    content: StrictStr = ""
    options: PageOptions = Field(default_factory=PageOptions)


def page_problem(e: ValidationError) -> str:
    """One line for a page message that does not validate, naming the field by its full path."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return "the page's message is not valid JSON"
    where = ".".join(str(x) for x in first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return f"unrecognized field {where}"
    return f"{where}: {first.get('msg')} (got {first.get('input')!r})" if where else str(first.get("msg"))


async def follow(gen: Generation):
    """The generation's events as ("token", text released, token id), then ("done", last text, finish
    reason) or ("error", message, kind). Whoever stops iterating must cancel ``gen.seq``."""
    got: list[int] = []  # the engine may be steps ahead of what has been read
    while True:
        ev = await gen.events.get()
        if ev[0] == "token":
            got.append(ev[1])
            yield "token", gen.text.delta(got, final=False), ev[1]
        elif ev[0] == "done":
            yield "done", gen.text.delta(got, final=True), ev[1]
            return
        else:
            yield "error", ev[2], ev[1]
            return


# -- the routes ----------------------------------------------------------------------------------------


def add_chat(app, *, start, tokenizer, model_name: str, block_size: int, template: ChatTemplate | None = None,
             chats: ChatStore | None = None) -> None:
    """Add ``/v1/chat/completions``, ``/chat``, ``/chat/ws`` and ``/chat/api/...`` to the serve app.
    ``start`` is create_app's: it checks a prompt and submits it (raising ``Refused``)."""
    from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
    from starlette.websockets import WebSocketDisconnect

    template = template or ChatTemplate()
    chats = chats or ChatStore(":memory:")
    short_name = model_name.rstrip("/").rsplit("/", 1)[-1]

    def prompt_of(messages: list[dict]) -> list[int]:
        try:
            return tokenizer.encode(template.render(messages))
        except ChatTemplateError as e:
            raise Refused(400, str(e), param="messages") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model is not None and body.model not in (model_name, short_name):
            return error_response(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                          param="model")
        if not body.messages:
            return error_response(400, "messages is empty: give at least one message", param="messages")
        if body.max_completion_tokens is not None:
            if body.max_tokens not in (None, body.max_completion_tokens):
                return error_response(400, "give max_tokens or max_completion_tokens, not two different values",
                              param="max_completion_tokens")
            body.max_tokens = body.max_completion_tokens
        problem = check_sampling(body)
        if problem:
            return error_response(400, problem[0], param=problem[1])
        try:
            gen = start(prompt_of([dict(role=m.role, content=m.text()) for m in body.messages]), body,
                        what="conversation")
        except Refused as e:
            return e.response()
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage() -> dict:
            return {"prompt_tokens": len(gen.prompt), "completion_tokens": len(gen.seq.tokens),
                    "total_tokens": len(gen.prompt) + len(gen.seq.tokens)}

        def chunk(delta: dict, tokens: list[int], finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
                                 "token_ids": tokens}]}

        if body.stream:
            async def sse():
                try:
                    yield sse_event(chunk({"role": "assistant", "content": ""}, [], None))
                    async for kind, piece, extra in follow(gen):
                        if kind == "token":
                            yield sse_event(chunk({"content": piece}, [extra], None))
                        elif kind == "done":
                            yield sse_event(chunk({"content": piece} if piece else {}, [], extra))
                            if body.stream_options and body.stream_options.include_usage:
                                yield sse_event({"id": rid, "object": "chat.completion.chunk", "created": created,
                                            "model": model_name, "choices": [], "usage": usage()})
                        else:
                            yield sse_event({"error": {"message": piece, "type": extra, "param": None, "code": None}})
                    yield "data: [DONE]\n\n"
                finally:  # done, or the client went away: either way the slot is free
                    gen.seq.cancel()

            return StreamingResponse(sse(), media_type="text/event-stream")

        while True:
            try:
                ev = await asyncio.wait_for(gen.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    gen.seq.cancel()
                    return Response(status_code=499)  # nobody is listening; the slot is freed
                continue
            if ev[0] == "done":
                return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                        "choices": [{"index": 0, "finish_reason": ev[1], "logprobs": None,
                                     "message": {"role": "assistant",
                                                 "content": gen.text.delta(list(gen.seq.tokens), final=True)},
                                     "token_ids": list(gen.seq.tokens)}],
                        "usage": usage()}
            if ev[0] == "error":
                return error_response({"timeout": 504, "shutdown": 503}.get(ev[1], 500), ev[2], kind=ev[1])

    # -- the page --------------------------------------------------------------------------------------

    @app.get("/chat", response_class=HTMLResponse)
    async def chat_page():
        return PAGE

    @app.get("/chat/chat.js")
    async def chat_script():
        return FileResponse(STATIC / "chat.js", media_type="text/javascript")

    @app.get("/chat/api/conversations")
    async def conversations():
        return {"model": model_name, "conversations": chats.list()}

    def conversation_or_404(cid: str):
        found = chats.get(cid)
        if found is None:
            return None, error_response(404, f"no conversation {cid!r}", kind="not_found", param="conversation")
        return found, None

    @app.get("/chat/api/conversations/{cid}")
    async def conversation(cid: str):
        found, missing = conversation_or_404(cid)
        return missing or found

    @app.get("/chat/api/conversations/{cid}/export")
    async def export(cid: str, format: str = "md"):
        found, missing = conversation_or_404(cid)
        if missing:
            return missing
        if format not in ("md", "json"):
            return error_response(400, f"format={format!r}: export as md or json", param="format")
        body = to_markdown(found) if format == "md" else json.dumps(found, indent=1, ensure_ascii=False)
        media = "text/markdown" if format == "md" else "application/json"
        return Response(body, media_type=f"{media}; charset=utf-8",
                        headers={"content-disposition": f'attachment; filename="chat-{cid}.{format}"'})

    @app.websocket("/chat/ws")
    async def chat_socket(ws: WebSocket):
        await ws.accept()
        await ws.send_json(dict(type="hello", model=model_name, block_size=block_size, defaults=PAGE_DEFAULTS,
                                template=template.origin))
        running: list = []  # (task, generation) of the reply being generated, at most one

        def figures(t0, first, last, n, finish, prompt_tokens) -> dict:
            return dict(ttft_ms=None if first is None else (first - t0) * 1e3,
                        tok_s=(n - 1) / (last - first) if n > 1 and last > first else None,
                        tokens=n, prompt_tokens=prompt_tokens, finish_reason=finish)

        async def begin(msg: PageMessage) -> None:
            t0 = time.perf_counter()
            content = msg.content
            if not content.strip():
                raise Refused(400, "the message is empty: type something to send")
            if len(content) > MAX_MESSAGE_CHARS:
                raise Refused(400, f"the message has {len(content)} characters; at most {MAX_MESSAGE_CHARS} are taken")
            history = []
            if msg.conversation is not None:
                found = chats.get(msg.conversation)
                if found is None:
                    raise Refused(404, f"no conversation {msg.conversation!r} (start a new one)")
                history = [dict(role=m["role"], content=m["content"]) for m in found["messages"]]
            problem = check_sampling(msg.options)
            if problem:
                raise Refused(400, problem[0])
            gen = start(prompt_of(history + [dict(role="user", content=content)]), msg.options, what="conversation")
            try:
                cid = msg.conversation or chats.create(model_name, content)
                chats.add(cid, "user", content)
            except ChatStoreError:
                gen.seq.cancel()  # nobody will follow it
                raise
            s = dict(text="", first=None, last=None, n=0, finish="cancelled")

            async def run():
                try:  # from here on, whatever happens cancels the generation when it ends
                    await ws.send_json(dict(type="start", conversation=cid, prompt_tokens=len(gen.prompt)))
                    async for kind, piece, extra in follow(gen):
                        if kind == "error":
                            s["finish"] = extra
                            await ws.send_json(dict(type="error", message=piece))
                            return
                        now = time.perf_counter()
                        s["text"] += piece
                        if kind == "token":
                            s["n"] += 1
                            s["first"] = s["first"] or now
                            s["last"] = now
                            await ws.send_json(dict(type="token", text=piece))
                        else:
                            s["finish"] = extra
                            await ws.send_json(dict(type="done", text=piece, stats=figures(
                                t0, s["first"], s["last"], s["n"], extra, len(gen.prompt))))
                except (WebSocketDisconnect, OSError, RuntimeError):
                    pass  # the page went away mid-reply (starlette and uvicorn say so in these three ways)
                finally:  # done, stopped, or the socket closed: free the slot, keep what was generated
                    gen.seq.cancel()
                    if s["n"]:
                        chats.add(cid, "assistant", s["text"],
                                  figures(t0, s["first"], s["last"], s["n"], s["finish"], len(gen.prompt)))

            running[:] = [(asyncio.create_task(run()), gen)]

        try:
            while True:
                raw = await ws.receive_text()
                if running and running[0][0].done():
                    running.clear()
                try:
                    msg = PageMessage.model_validate_json(raw)
                except ValidationError as e:
                    await ws.send_json(dict(type="error", message=page_problem(e)))
                    continue
                if msg.type == "stop":
                    if running:
                        running[0][1].seq.cancel()
                    continue
                if running:
                    await ws.send_json(dict(type="error", message="a reply is still being generated: wait or stop it"))
                    continue
                try:
                    await begin(msg)
                except Refused as e:
                    await ws.send_json(dict(type="error", message=e.message))
                except ChatStoreError as e:  # the conversations file cannot be written: say so, keep serving
                    await ws.send_json(dict(type="error", message=str(e)))
        except WebSocketDisconnect:
            pass
        finally:  # the page went away: its reply stops, and the part generated is kept
            if running:
                running[0][1].seq.cancel()
                await asyncio.gather(running[0][0], return_exceptions=True)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bench serve · chat</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; display: flex; height: 100vh; color: #222; }
aside { width: 250px; border-right: 1px solid #ddd; padding: 12px; overflow-y: auto; background: #fafafa; }
aside ul { list-style: none; padding: 0; margin: 8px 0; }
aside li a { display: block; padding: 5px 6px; border-radius: 4px; color: #222; text-decoration: none;
             white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
aside li a.current { background: #e4ecf7; }
aside li small { color: #888; }
main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
header { padding: 8px 16px; border-bottom: 1px solid #ddd; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
#status { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #eee; }
#status.up { background: #d8f0d8; } #status.down { background: #f6dada; }
#messages { flex: 1; overflow-y: auto; padding: 16px; }
.message { max-width: 760px; margin: 0 0 14px; }
.message .role { font-size: 12px; color: #777; text-transform: uppercase; letter-spacing: .04em; }
.message .text { white-space: pre-wrap; word-wrap: break-word; padding: 8px 10px; border-radius: 6px; background: #f3f3f3; }
.message.user .text { background: #e4ecf7; }
.message .figures { font-size: 12px; color: #666; margin-top: 3px; font-variant-numeric: tabular-nums; }
#error { color: #a00; padding: 0 16px; min-height: 1.2em; }
form { display: flex; gap: 8px; padding: 12px 16px; border-top: 1px solid #ddd; }
textarea { flex: 1; font: inherit; min-height: 3em; }
label { font-size: 12px; color: #555; } label input { width: 5em; }
</style>
</head>
<body>
<aside>
<button id="new" type="button">New conversation</button>
<ul id="conversations"></ul>
</aside>
<main>
<header>
<strong id="model">bench serve</strong>
<span id="status">connecting…</span>
<label>temperature <input id="temperature" type="number" min="0" step="0.1"></label>
<label>top-p <input id="top_p" type="number" min="0.01" max="1" step="0.05"></label>
<label>max tokens <input id="max_tokens" type="number" min="1" step="1"></label>
<span id="export" hidden>export: <a id="export-md" href="#">Markdown</a> · <a id="export-json" href="#">JSON</a></span>
</header>
<div id="messages"></div>
<div id="error" role="alert"></div>
<form id="compose"><textarea id="input" placeholder="Message (Enter sends, Shift+Enter a new line)"></textarea>
<button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button></form>
</main>
<script src="/chat/chat.js"></script>
</body>
</html>
"""
