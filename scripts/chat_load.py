"""Load the chat page's WebSocket the way `bench load` loads /v1/completions, for the figures in
docs/serving.md: N one-message conversations arriving at a Poisson RATE (seeded), each asking for
GEN tokens greedily; prints what the page shows per reply (the server's TTFT and decode tokens/s)
and their medians.

    python scripts/chat_load.py ws://127.0.0.1:8000/chat/ws RATE N GEN [MESSAGE]

With the byte tokenizer of a preset, the default 15-character message makes a 32-token prompt
through the default chat template ("user: " + message + "\\nassistant:").
"""

import asyncio
import json
import random
import statistics
import sys

import websockets


async def one(url: str, delay: float, content: str, gen: int):
    await asyncio.sleep(delay)
    async with websockets.connect(url) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps(dict(type="send", content=content, options=dict(max_tokens=gen, temperature=0))))
        prompt = None
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == "start":
                prompt = m["prompt_tokens"]
            if m["type"] in ("done", "error"):
                return m, prompt


async def main(url: str, rate: float, n: int, gen: int, content: str) -> None:
    rng = random.Random(0)
    t, delays = 0.0, []
    for _ in range(n):
        delays.append(t)
        t += rng.expovariate(rate)
    out = await asyncio.gather(*(one(url, d, content, gen) for d in delays))
    stats = [m["stats"] for m, _ in out if m["type"] == "done"]
    print(f"prompt tokens {out[0][1]}; {len(stats)} replies, {sum(m['type'] == 'error' for m, _ in out)} errors")
    for s in stats:
        print(f"  TTFT {s['ttft_ms']:.1f} ms  {s['tok_s'] or 0:.1f} tokens/s  {s['tokens']} tokens  {s['finish_reason']}")
    print(f"median TTFT {statistics.median(s['ttft_ms'] for s in stats):.1f} ms; "
          f"median tokens/s {statistics.median(s['tok_s'] for s in stats if s['tok_s']):.1f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (4, 5):
        sys.exit("usage: chat_load.py URL RATE N GEN [MESSAGE]")
    asyncio.run(main(args[0], float(args[1]), int(args[2]), int(args[3]), args[4] if len(args) > 4 else "x" * 15))
