"""The machine a number was measured on, and what it could do at best.

- ``environment``: the fingerprint (CPU and ISA flags, memory, OS, library versions, thread
  variables, git commit) every run stores, and its id.
- ``roofline``: measured memory bandwidth and matmul peaks, cached per machine; the decode bound.
- ``sentinel``: the drift sentinel, a fixed small workload read at the start of every round.

Imports ``bench.results.schema`` (the fingerprint's diff), ``model`` and ``backends``' probes.
"""
