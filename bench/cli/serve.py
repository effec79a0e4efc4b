"""``bench serve`` (an OpenAI-compatible server), ``bench load`` (load it) and ``bench dashboard`` (watch the store)."""

from __future__ import annotations

import json

from bench.cli.common import EXIT_FAILURE, UsageError, err, out_console, positive_int, say


def add_serve(sub, default_store: str) -> None:
    srv = sub.add_parser("serve", help="serve one backend over HTTP: OpenAI-compatible completions and chat, "
                                       "a chat page, continuous batching, /health and /metrics")
    srv.add_argument("--backend", required=True)
    srv.add_argument("--precision", default=None)
    srv.add_argument("--model", help="a preset (random weights)")
    srv.add_argument("--checkpoint",
                     help="a checkpoint directory or s3://bucket/prefix (its tokenizer serves text prompts)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    srv.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together at most (default 8)")
    srv.add_argument("--queue-size", type=positive_int, default=64,
                     help="requests that may wait for a batch row; beyond them the server answers 429 (default 64)")
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take, queue included (default 300)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds a shutdown waits for running requests to finish (default 30)")
    srv.add_argument("--threads", type=positive_int, default=None)
    srv.add_argument("--chats", default=None,
                     help="SQLite file of the chat page's conversations (default: chats.sqlite beside the default "
                          "store, runs/chats.sqlite)")
    srv.set_defaults(fn=cmd_serve)


def add_load(sub, default_store: str) -> None:
    load = sub.add_parser("load", help="load a bench serve server (Poisson or gamma arrivals, streaming) and "
                                       "store TTFT, TPOT, ITL, throughput and goodput as serve cells")
    load.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    load.add_argument("--num-requests", type=positive_int, required=True)
    load.add_argument("--rate", default="inf",
                      help="requests per second, comma-separated for several load points; inf sends all at once "
                           "(default inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier (default 1)")
    load.add_argument("--max-concurrency", type=positive_int, default=None, help="requests in flight at most")
    load.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens per request (default 32)")
    load.add_argument("--gen-len", type=positive_int, default=32, help="tokens generated per request (default 32)")
    load.add_argument("--slo", action="append", metavar="KIND:MS",
                      help="a service-level objective for goodput: ttft:MS, tpot:MS or e2e:MS (repeatable)")
    load.add_argument("--seed", type=int, default=0, help="seed of the arrivals and prompts (default 0)")
    load.add_argument("--duration", type=float, default=600.0,
                      help="seconds one load point may take at most; what is unfinished then is an error (default 600)")
    load.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request, s (default 300)")
    load.add_argument("--store", default=default_store)
    load.add_argument("--name", help="a name to remember the run by")
    load.add_argument("--json", action="store_true", help="print the run id and cells as JSON")
    load.set_defaults(fn=cmd_load)


def add_dashboard(sub, default_store: str) -> None:
    dash = sub.add_parser("dashboard", help="a live web page over the store: sweeps, training and serving as they run")
    dash.add_argument("--store", default=default_store)
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    dash.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    dash.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the store (default 0.5)")
    dash.set_defaults(fn=cmd_dashboard)


def cmd_serve(args) -> int:
    from bench.scenarios.serve import serve

    serve(args.backend, host=args.host, port=args.port, precision=args.precision, model=args.model,
          checkpoint=args.checkpoint, threads=args.threads, max_batch=args.max_batch, queue_size=args.queue_size,
          timeout_s=args.timeout, drain_s=args.drain_timeout, chats_path=args.chats, announce=lambda line: err.print(line, markup=False))
    return stopped()


def cmd_load(args) -> int:
    from bench.machine.environment import fingerprint
    from bench.scenarios.load import LoadSpec, parse_rates, parse_slo, run_and_store
    from bench.store import Store
    from reports.terminal import load_line, load_table

    slo = dict(parse_slo(x) for x in args.slo or [])
    specs = [LoadSpec(url=args.url.rstrip("/"), num_requests=args.num_requests, prompt_len=args.prompt_len,
                      gen_len=args.gen_len, rate=rate, burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, slo_ms=slo, seed=args.seed, duration_s=args.duration,
                      request_timeout_s=args.request_timeout) for rate in parse_rates(args.rate)]
    store = Store(args.store)
    cells = []

    def shown(record):
        cells.append(record)
        if not args.json:
            say(load_line(record))

    run_id = run_and_store(specs, store, fingerprint(), name=args.name, on_cell=shown)
    if args.json:
        print(json.dumps(dict(run_id=run_id, cells=cells), indent=1, default=str))
    else:
        out_console().print(load_table(cells, run_id))
    return 0 if any(c["status"] == "ok" for c in cells) else EXIT_FAILURE


def cmd_dashboard(args) -> int:
    """A live, read-only page over the store; the store is opened per request, read-only."""
    import uvicorn

    from bench.results.compare import compare_runs
    from bench.store import Store
    from reports.dashboard import create_app

    Store(args.store, read_only=True).close()  # a missing or foreign store is one line now, not per request
    if not args.poll > 0:
        raise UsageError(f"bench dashboard: --poll {args.poll} must be a positive number of seconds")
    if not 0 < args.port < 65536:
        raise UsageError(f"bench dashboard: --port {args.port} is not a TCP port (1-65535)")
    app = create_app(lambda: Store(args.store, read_only=True), compare=compare_runs, poll_s=args.poll)
    err.print(f"dashboard of {args.store} at http://{args.host}:{args.port}/ (Ctrl-C stops it)")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    app.state.stopping = lambda: server.should_exit  # open event streams end; pages reconnect to the next server
    server.run()
    return stopped()


def stopped() -> int:
    """A server's run returned: only a signal (Ctrl-C, SIGTERM) stops it. uvicorn sometimes raises
    the signal again after its graceful shutdown (``main`` then says "stopped", exit 130) and
    sometimes returns; both end the same way."""
    err.print("stopped", markup=False)
    return 130
