"""The harness: plan a sweep, run each cell in its own process, measure, derive, store.

Rooms, by concept:

- ``cli/``: the ``bench`` command, one module per command group; each handler parses, makes one
  call and renders (``reports.terminal``).
- ``planner``: the one planner. What runs and what is skipped and why, every value, length and
  path validated, before anything is measured. Used by sweeps, serving and quality.
- ``sweep``: running a plan in interleaved rounds of launches, each stored as it lands.
- ``models``: a preset name or a checkpoint (local or ``s3://``) turned into a model.
- ``spec``: a cell's typed identity, from the plan to the stored record.
- ``store``: the SQLite store of runs, cells, launches and training runs.
- ``quantize`` and ``training``: ``bench quantize`` and ``bench train``'s work.
- ``scenarios/``: what a cell measures (inference, train, quality, serve and load).
- ``executors/``: where launches run (this machine, a Ray cluster); one process per launch.
- ``results/``: the record's schema, statistics, the derivation of every rate, run comparison.
- ``machine/``: the environment fingerprint, the roofline, the drift sentinel.

``bench`` imports ``backends`` and ``model`` below it; ``reports`` only from ``cli/``. Inside,
nothing imports upward: the CLI sits on the planner and the sweep, which sit on the scenarios,
executors, results and machine; ``tests/test_layout.py`` checks that no import cycle exists.
"""
