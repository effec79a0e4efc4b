"""From raw samples to the numbers a report shows, derived in one place.

- ``schema``: the cell record's fields and their meaning, the shape of every stored result.
- ``stats``: robust summaries and the hierarchical bootstrap interval (launches, then generations).
- ``records``: a cell's launches merged and every rate derived once (``decode_rate``: decode
  tokens/s and its interval), and the records of cells that did not run.
- ``compare``: two runs cell by cell, with a noise floor measured from their drift sentinels.

Imports ``bench.spec`` and ``bench.machine`` (the roofline's arithmetic) only.
"""
