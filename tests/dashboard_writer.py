"""A second process that writes the store while the dashboard reads it (tests/test_dashboard.py).

    python tests/dashboard_writer.py STORE RUN_ID cell  MODEL      one more finished cell (a launch and its record)
    python tests/dashboard_writer.py STORE RUN_ID steps FIRST N    N more training steps of a training run
    python tests/dashboard_writer.py STORE RUN_ID burst N          N launches as fast as it can, reporting errors

Records are copies of the report fixture's cells, renamed, so the page has real fields to show.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.spec import cell_id  # noqa: E402
from bench.store import Store  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "run_a.json"


def fixture_cell(model: str, index: int = 0) -> dict:
    cells = [c for c in json.loads(FIXTURE.read_text())["cells"] if c.get("status") == "ok"]
    cell = dict(cells[index % len(cells)], model=model, attempt=0)
    cell["cell_id"] = cell_id(cell)
    return cell


def add_cell(store: Store, run_id: str, model: str, index: int = 0) -> dict:
    cell = fixture_cell(model, index)
    store.add_launch(run_id, cell["cell_id"], 0, dict(status="ok", attempt=0, wall_s=2.0))
    store.add_cell(run_id, cell)
    return cell


def main(argv: list[str]) -> int:
    path, run_id, what, *rest = argv
    store = Store(path)
    if what == "cell":
        add_cell(store, run_id, rest[0])
    elif what == "steps":
        first, n = int(rest[0]), int(rest[1])
        for step in range(first, first + n):
            store.add_training_step(run_id, step, dict(loss=5.0 - 0.01 * step, lr=1e-3, tokens_per_s=1000.0 + step,
                                                       step_s=0.1))
    elif what == "burst":
        errors = 0
        for i in range(int(rest[0])):
            try:
                add_cell(store, run_id, f"burst-{i}", i)
            except Exception as e:  # a "database is locked" here is what the test looks for
                errors += 1
                print(f"{type(e).__name__}: {e}", file=sys.stderr)
        print(json.dumps(dict(errors=errors)))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
