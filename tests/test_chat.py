"""bench serve's chat: ``/v1/chat/completions`` through the official ``openai`` client, the page's
WebSocket, and the ``/chat`` page in headless Chromium (Playwright driving Debian's chromium, as
tests/test_dashboard.py does).

Real uvicorn servers on 127.0.0.1 with the tiny preset on eager (tests/test_serve.py's
``make_app``); conversations in a temporary SQLite file. Slow steps come from a backend that
sleeps in each decode step, so a reply is reliably still running when a test needs it to be.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from bench.scenarios.chat_store import ChatStore
from bench.scenarios.chat import DEFAULT_TEMPLATE, ChatTemplate, ChatTemplateError
from bench.scenarios.serve import serving_in_thread
from tests.test_serve import TIMEOUT, make_app

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def chat_app(model, tmp_path, name="chats.sqlite", **kw):
    """test_serve's app (its slow eager engine), with the conversations in a file under ``tmp_path``."""
    _, engine = make_app(model, **kw)
    from bench.scenarios.serve import create_app
    from model.tokenizer import ByteTokenizer

    tok = ByteTokenizer(model.config.vocab_size)
    app = create_app(engine, tok, model_name="tiny", info=dict(backend="eager"), timeout_s=30.0,
                     vocab_size=model.config.vocab_size, eos_token_id=tok.eos_token_id,
                     chats=ChatStore(tmp_path / name))
    return app, engine


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    app, engine = chat_app(tiny_model, tmp_path_factory.mktemp("chat"), delay=0.002)
    with serving_in_thread(app) as (_, url):
        yield url, engine


def chat_stream(url: str, body: dict) -> tuple[list[int], str, str | None]:
    tokens, text, finish = [], "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=dict(body, stream=True), timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
    return tokens, text, finish


# --- the API ---------------------------------------------------------------------------------------------

def test_the_official_openai_client_chats_streaming_and_not(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    done = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                          extra_body=dict(ignore_eos=True))
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    prompt = ChatTemplate().render(messages)
    assert prompt == "system: Be brief.\nuser: Hello\nassistant:"  # the documented default template
    assert done.usage.prompt_tokens == len(prompt.encode()) and done.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=dict(ignore_eos=True)))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # the newer name for max_tokens, and content as a list of text parts
    parts = client.chat.completions.create(model="tiny", max_completion_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}])
    assert parts.usage.completion_tokens <= 3 and parts.usage.prompt_tokens == len("user: Hello\nassistant:")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=messages)


def test_concurrent_chats_get_exactly_the_tokens_of_a_single_one(tiny_model, tmp_path):
    """Conversations of different lengths arrive staggered and join a running batch; at temperature 0
    each gets, token for token, what it gets alone."""
    app, engine = chat_app(tiny_model, tmp_path, delay=0.005, max_batch=4)
    convs = [[{"role": "user", "content": "x" * n}] for n in (1, 9, 4, 17, 2)]
    convs[2] = [{"role": "system", "content": "sys"}] + convs[2] + [{"role": "assistant", "content": "ok"},
                                                                    {"role": "user", "content": "more"}]
    body = dict(max_tokens=16, temperature=0, ignore_eos=True)
    with serving_in_thread(app) as (_, url):
        alone = [chat_stream(url, dict(body, messages=c))[0] for c in convs]

        async def together():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                async def one(i, c):
                    await asyncio.sleep(0.01 * i)  # staggered: later ones join mid-generation
                    r = await client.post(url + "/v1/chat/completions", json=dict(body, messages=c))
                    return r.json()["choices"][0]["token_ids"]
                return await asyncio.gather(*(one(i, c) for i, c in enumerate(convs)))

        batched = asyncio.run(together())
    assert all(len(t) == 16 for t in alone)
    assert engine.peak_running > 1  # they did share a batch
    assert batched == alone


@pytest.mark.parametrize("body,status,words", [
    (dict(messages=[]), 400, "messages is empty"),
    (dict(messages=[{"role": "user", "content": "x" * 300}]), 400, "maximum context length is 256"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=250), 400, "maximum context length is 256"),
    (dict(messages=[{"role": "user", "content": "hi"}], model="gpt-4"), 404, "the model 'gpt-4' does not exist"),
    (dict(messages=[{"role": "tool", "content": "hi"}]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    (dict(messages=[{"role": "user", "content": "hi"}], n=2), 400, "n=1"),
    (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=2, max_completion_tokens=3), 400,
     "not two different values"),
    (dict(messages=[{"role": "user", "content": "hi"}], prompt="hi"), 400,
     "unrecognized request argument supplied: prompt"),
])
def test_bad_chat_requests_get_one_clear_line_and_the_server_keeps_serving(server, body, status, words):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message
    ok = httpx.post(url + "/v1/chat/completions", json=dict(messages=[{"role": "user", "content": "hi"}], max_tokens=2),
                    timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_a_full_queue_answers_429_and_the_chats_it_took_are_served(tiny_model, tmp_path):
    app, engine = chat_app(tiny_model, tmp_path, delay=0.05, max_batch=1, queue_size=1)
    body = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, ignore_eos=True)
    with serving_in_thread(app) as (_, url):
        async def burst():
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                return await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=body) for _ in range(5)))
        answers = asyncio.run(burst())
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in answers if r.status_code == 429).json()["error"]
        assert refused["type"] == "rate_limit_exceeded" and "try again later" in refused["message"]
        assert all(r.json()["usage"]["completion_tokens"] == 6 for r in answers if r.status_code == 200)
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT).status_code == 200


def test_a_chat_client_that_disconnects_mid_stream_frees_its_slot(tiny_model, tmp_path):
    app, engine = chat_app(tiny_model, tmp_path, delay=0.05, max_batch=1)
    body = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=200, ignore_eos=True, stream=True)
    with serving_in_thread(app) as (_, url):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            for line in r.iter_lines():  # leave after the first token
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["token_ids"]:
                    break
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0  # cancelled long before its 200 tokens
        short = dict(body, max_tokens=3, stream=False)
        assert httpx.post(url + "/v1/chat/completions", json=short, timeout=TIMEOUT).json()["usage"][
            "completion_tokens"] == 3


def test_the_checkpoint_chat_template_is_used_and_sandboxed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token={"content": "<s>"}, eos_token="</s>",
        chat_template="{{ bos_token }}{% for m in messages %}[{{ m.role|upper }}] {{ m.content }}{{ eos_token }}"
                      "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")))
    template = ChatTemplate.for_checkpoint(tmp_path, None)
    assert template.origin.endswith("tokenizer_config.json")
    assert template.render([dict(role="user", content="hi")]) == "<s>[USER] hi</s>[ASSISTANT]"
    assert ChatTemplate.for_checkpoint(tmp_path / "none", None).source == DEFAULT_TEMPLATE
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        escape.render([dict(role="user", content="hi")])
    with pytest.raises(ChatTemplateError, match="only users"):
        ChatTemplate("{{ raise_exception('only users') }}").render([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_the_conversations_file_is_made_by_the_first_conversation_and_a_foreign_one_refused(tmp_path):
    import sqlite3

    from bench.scenarios.chat_store import ChatStoreError

    path = tmp_path / "runs" / "chats.sqlite"
    store = ChatStore(path)
    assert store.list() == [] and store.get("x") is None and not path.exists()  # a server nobody chats with
    cid = store.create("tiny", "  Hello\n  there  " + "x" * 100)
    store.add(cid, "user", "Hello")
    store.close()
    again = ChatStore(path)
    (only,) = again.list()
    assert only["title"] == ("Hello there " + "x" * 100)[:60] and only["n_messages"] == 1
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE stuff (x)")
    with pytest.raises(ChatStoreError, match="not a bench conversations file"):
        ChatStore(foreign)


# --- the page's WebSocket ------------------------------------------------------------------------------

def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/chat/ws"


def exchange(ws, message: dict) -> list[dict]:
    """Send one page message; the server's answers up to "done" or "error"."""
    ws.send(json.dumps(message))
    out = []
    while not out or out[-1]["type"] not in ("done", "error"):
        out.append(json.loads(ws.recv(timeout=30)))
    return out


def test_the_socket_streams_a_reply_stores_it_and_refuses_bad_messages(server):
    from websockets.sync.client import connect

    url, _ = server
    with connect(ws_url(url)) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and hello["block_size"] == 256
        first = exchange(ws, dict(type="send", content="Hello", options=dict(max_tokens=5, temperature=0)))
        assert first[0]["type"] == "start" and first[-1]["type"] == "done"
        assert [m["type"] for m in first[1:-1]] == ["token"] * 5
        stats = first[-1]["stats"]
        assert stats["tokens"] == 5 and stats["ttft_ms"] > 0 and stats["tok_s"] > 0
        cid = first[0]["conversation"]
        second = exchange(ws, dict(type="send", conversation=cid, content="Again", options=dict(max_tokens=3)))
        assert second[0]["prompt_tokens"] > first[0]["prompt_tokens"] + 5  # the history went in
        for bad, words in [(dict(type="send", content="   "), "the message is empty"),
                           (dict(type="send", content="x" * 400), "maximum context length is 256"),
                           (dict(type="send", conversation="nope", content="hi"), "no conversation 'nope'"),
                           (dict(type="send", content="hi", options=dict(top_p=2)), "top_p=2"),
                           (dict(type="send", content="hi", options=dict(max_tokens="9")), "max_tokens"),
                           (dict(type="shout"), "type")]:
            answer = exchange(ws, bad)
            assert answer[-1]["type"] == "error" and words in answer[-1]["message"], answer
    conv = httpx.get(f"{url}/chat/api/conversations/{cid}", timeout=TIMEOUT).json()
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][1]["stats"]["tokens"] == 5 and conv["title"] == "Hello"
    md = httpx.get(f"{url}/chat/api/conversations/{cid}/export?format=md", timeout=TIMEOUT)
    assert md.headers["content-disposition"] == f'attachment; filename="chat-{cid}.md"'
    assert "## user\n\nHello\n" in md.text and "tokens/s" in md.text
    exported = httpx.get(f"{url}/chat/api/conversations/{cid}/export?format=json", timeout=TIMEOUT).json()
    assert exported["messages"][2]["content"] == "Again"
    assert httpx.get(f"{url}/chat/api/conversations/nope", timeout=TIMEOUT).status_code == 404


def test_a_page_that_closes_mid_reply_frees_the_slot_and_keeps_the_part_generated(tiny_model, tmp_path):
    from websockets.sync.client import connect

    app, engine = chat_app(tiny_model, tmp_path, delay=0.05, max_batch=1)
    with serving_in_thread(app) as (_, url):
        with connect(ws_url(url)) as ws:
            ws.recv(timeout=10)
            ws.send(json.dumps(dict(type="send", content="hi", options=dict(max_tokens=200))))
            start = json.loads(ws.recv(timeout=10))
            assert json.loads(ws.recv(timeout=10))["type"] == "token"
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0
        kept = httpx.get(f"{url}/chat/api/conversations/{start['conversation']}", timeout=TIMEOUT).json()["messages"]
        assert kept[-1]["role"] == "assistant" and kept[-1]["stats"]["finish_reason"] == "cancelled"
        assert 1 <= kept[-1]["stats"]["tokens"] < 200
        with connect(ws_url(url)) as ws:  # and the server keeps serving
            ws.recv(timeout=10)
            assert exchange(ws, dict(type="send", content="hi", options=dict(max_tokens=2)))[-1]["type"] == "done"


# --- the page in a real browser ------------------------------------------------------------------------

def test_the_chat_page_streams_reopens_exports_and_shows_hostile_text_as_text(tiny_model, tmp_path, browser):
    from tests.test_dashboard import ROOT

    app, _ = chat_app(tiny_model, tmp_path, delay=0.03)  # 40 tokens: over a second to watch them arrive
    with serving_in_thread(app) as (_, url):
        page = browser.new_page(viewport=dict(width=1200, height=800), accept_downloads=True)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(url + "/chat")
        page.wait_for_function("document.body.getAttribute('data-connected') === '1'", timeout=15_000)
        page.fill("#max_tokens", "40")
        page.fill("#temperature", "0")
        page.fill("#input", HOSTILE)
        page.press("#input", "Enter")
        # tokens arrive one by one: some are shown while the reply is not done yet
        page.wait_for_function("(() => { const r = document.querySelector('.message.assistant');"
                               " return r && Number(r.getAttribute('data-tokens')) >= 3 && !r.hasAttribute('data-done')"
                               " && r.querySelector('.text').textContent.length > 0; })()", timeout=15_000)
        page.wait_for_selector(".message.assistant[data-done='1']", timeout=15_000)
        figures = page.text_content(".message.assistant .figures")
        assert "TTFT" in figures and "tokens/s" in figures and "40 tokens" in figures
        assert page.text_content(".message.user .text") == HOSTILE  # the text it is
        assert page.evaluate("window.__pwned") is None and page.locator("#messages img").count() == 0
        reply = page.text_content(".message.assistant .text")
        out = ROOT / "runs" / "chat-screenshot.png"
        out.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(out))
        page.reload()  # the address holds the conversation: it comes back, from the server
        page.wait_for_selector(".message.assistant", timeout=15_000)
        assert page.text_content(".message.user .text") == HOSTILE
        assert page.text_content(".message.assistant .text") == reply
        assert page.locator("#conversations a").count() == 1
        assert page.text_content("#conversations a") == HOSTILE
        with page.expect_download() as download:
            page.click("#export-md")
        text = open(download.value.path(), encoding="utf-8").read()
        assert download.value.suggested_filename.endswith(".md") and HOSTILE in text and reply in text
        assert page.evaluate("window.__pwned") is None and errors == []


def test_the_chat_page_reconnects_after_the_server_restarts(tiny_model, tmp_path, browser):
    app, _ = chat_app(tiny_model, tmp_path)
    with serving_in_thread(app) as (_, url):
        page = browser.new_page()
        page.goto(url + "/chat")
        page.wait_for_function("document.body.getAttribute('data-connected') === '1'", timeout=15_000)
    page.wait_for_function("document.body.getAttribute('data-connected') === '0'", timeout=15_000)
    port = int(url.rsplit(":", 1)[1])
    again, _ = chat_app(tiny_model, tmp_path)  # the same conversations file
    with serving_in_thread(again, port=port):
        page.wait_for_function("document.body.getAttribute('data-connected') === '1'", timeout=15_000)
        page.fill("#input", "after the restart")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant[data-done='1']", timeout=15_000)
        assert page.text_content("#error") == ""


