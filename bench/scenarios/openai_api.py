"""What ``bench serve``'s OpenAI-compatible endpoints share: completions (``bench.scenarios.serve``)
and chat (``bench.scenarios.chat``) read the same sampling settings, answer errors in OpenAI's
shape, release text through the same ``TextStream`` and follow a submitted ``Generation``.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, StrictBool

from bench.scenarios.engine import Sequence

# -- text ------------------------------------------------------------------------------------------


class TextStream:
    """The text of a growing list of tokens, released only where it can no longer change: not a
    partial UTF-8 character (it decodes as U+FFFD), not the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.sent = 0  # characters released

    def stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def delta(self, tokens: list[int], final: bool) -> str:
        text = self.tokenizer.decode(tokens)
        cut = self.stop_at(text)
        if cut is not None:
            text = text[:cut]
        elif not final:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        out = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return out


# -- requests, errors and streams --------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {
        "message": " ".join(str(message).split()), "type": kind, "param": param, "code": None}})


def validation_message(exc) -> tuple[str, str | None]:
    """One line for pydantic's first complaint, naming the field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # A union names each alternative it tried (prompt.str, prompt.list[int]); the field is the first.
    param = loc[0] if loc else None
    if e.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if e.get("type") == "missing":
        return f"missing required argument: {param}", param
    if param == "prompt":
        return f"prompt must be a string or a list of token ids (got {e.get('input')!r})", param
    if e.get("type") == "model_attributes_type":
        return "the body must be a JSON object", None
    return f"{param}: {e.get('msg')} (got {e.get('input')!r})" if param else str(e.get("msg")), param


def check_sampling(body) -> tuple[str, str] | None:
    """(message, param) for a setting in OpenAI's schema this server does not implement or that is out of
    range, or None. Completions and chat requests share these fields."""
    if body.max_tokens is not None and body.max_tokens <= 0:
        return f"max_tokens={body.max_tokens} must be at least 1", "max_tokens"
    if not math.isfinite(body.temperature) or body.temperature < 0:
        return f"temperature={body.temperature} must be >= 0 (0 is greedy)", "temperature"
    if not 0 < body.top_p <= 1:
        return f"top_p={body.top_p} must be in (0, 1]", "top_p"
    if body.top_k is not None and body.top_k != -1 and body.top_k < 1:
        return f"top_k={body.top_k} must be >= 1 (or -1 for no limit)", "top_k"
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        return "stop takes up to 4 non-empty strings", "stop"
    given = lambda name, default=None: getattr(body, name, default)  # noqa: E731  (chat lacks some)
    unsupported = [(body.n != 1, "n", "only n=1 is served"), (given("echo"), "echo", "echo is not supported"),
                   (given("logprobs") not in (None, False), "logprobs", "logprobs are not supported"),
                   (given("top_logprobs") is not None, "top_logprobs", "logprobs are not supported"),
                   (given("best_of") not in (None, 1), "best_of", "only best_of=1 is served"),
                   (given("suffix") is not None, "suffix", "suffix is not supported"),
                   (body.presence_penalty != 0, "presence_penalty", "presence_penalty is not supported"),
                   (body.frequency_penalty != 0, "frequency_penalty", "frequency_penalty is not supported")]
    for bad, param, message in unsupported:
        if bad:
            return message, param
    return None


class Refused(Exception):
    """A request the server will not run: its HTTP status and one line, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self):
        return error_response(self.status, self.message, kind=self.kind, param=self.param)


@dataclass
class Generation:
    """One submitted generation: the engine's sequence, the queue its events arrive on (on the
    event loop), the text released so far, and the prompt's token ids."""

    seq: Sequence
    events: asyncio.Queue
    text: TextStream
    prompt: list[int]


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
