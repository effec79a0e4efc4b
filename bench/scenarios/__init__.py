"""What a cell measures, one module a scenario, each run inside the process that measures it.

- ``inference``: load, warm up, timed generations token by token, parity against eager fp32.
- ``train``: optimizer steps (forward, backward, AdamW), their time, memory and loss.
- ``quality``: perplexity and divergence from eager fp32 on a trained model's test text.
- ``serve``: ``bench serve``, an OpenAI-compatible server over a backend; ``engine``: the
  continuous-batching engine and metrics behind it.
- ``load``: ``bench load``, a load generator against it, its load points stored as serve cells.

Imports ``bench.spec``, ``bench.models``, ``bench.results`` (statistics and records),
``backends`` and ``model``; never the planner, the executors or the CLI.
"""
