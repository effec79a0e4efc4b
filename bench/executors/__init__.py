"""Where a sweep's launches run: an executor behind one small interface, chosen once per run.

- ``local``: ``Job`` and ``LocalExecutor``, this machine, one launch at a time.
- ``cell``: one launch, one fresh process (``python -m bench.executors.cell``); every executor's
  launch is this.
- ``ray``: ``RayExecutor``, each launch a Ray task on a cluster node chosen by its labels.

``choose`` builds the one a command asked for, with the backends' probes as seen where the
launches will run. Imports ``bench.spec``, ``bench.machine``, ``bench.scenarios`` (in the cell
process), ``backends`` and ``model``; never the planner, the sweep loop or the CLI.
"""

from __future__ import annotations


def choose(name: str, backends: list[str], on: list[str] | None = None, address: str | None = None,
           announce=None):
    """(executor, probes) for ``--executor NAME``: None and this machine's probes (each in its own
    process, side by side) for "local", or a ``RayExecutor`` and its nodes' probes."""
    from backends import registry

    for b in backends:
        registry.get_backend_class(b)  # unknown names fail here, with the valid names
    if name == "ray":
        from bench.executors.ray import RayExecutor, parse_selectors

        executor = RayExecutor(backends, parse_selectors(on), address)
        if announce:
            announce(f"ray: {len(executor.nodes)} node(s) probed: " + ", ".join(
                f"{n.name} (fingerprint {n.fingerprint_id})" for n in executor.nodes.values()))
        return executor, executor.probes(backends)
    return None, registry.probe_all(names=backends)
