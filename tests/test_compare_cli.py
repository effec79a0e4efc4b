"""`bench compare` as the command: the --fail-above CI gate, --noise-floor, --format md and bad input.

The two runs are the report fixtures (tests/fixtures/run_a.json, run_b.json) stored through the
store API: run_b is run_a measured again after an onnxruntime upgrade, so onnxruntime is ~14%
slower, ipex fp32 ~14% faster and eager only re-measured. Three cells of each (tiny, batch 1,
one thread) keep the bootstrap of every comparison to a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.results.compare import FASTER, SAME, SLOWER, compare_runs
from bench.store import Store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CELLS = {("eager", "fp32"), ("onnxruntime", "fp32"), ("ipex", "fp32")}


def _store_run(store: Store, name: str) -> str:
    run = json.loads((FIXTURES / f"{name}.json").read_text())
    run_id = store.create_run(run["fingerprint"], run["sweep"], name=name)
    for r in run["rounds"]:
        store.add_round(run_id, r["round"], r["order"], r["sentinel"])  # the sentinels set the noise floor
    for cell in run["cells"]:
        if (cell["model"], cell["batch"], cell["threads"]) == ("tiny", 1, 1) and \
                (cell["backend"], cell["precision"]) in CELLS:
            store.add_cell(run_id, cell)
    return run_id


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The store, both run ids, and what the library says of them (the command must agree)."""
    path = tmp_path_factory.mktemp("compare") / "bench.sqlite"
    with Store(path) as store:
        a, b = _store_run(store, "run_a"), _store_run(store, "run_b")
        result = compare_runs(store.get_run(a), store.get_run(b))
    verdicts = {c.base["backend"]: c for c in result.cells}
    assert set(verdicts) == {b for b, _ in CELLS}
    assert verdicts["onnxruntime"].verdict == SLOWER and verdicts["ipex"].verdict == FASTER
    assert verdicts["eager"].verdict == SAME
    drop = -100 * verdicts["onnxruntime"].decode.change  # ~14%
    assert 5 < drop < 25, drop
    return dict(store=str(path), a=a, b=b, drop=drop, ipex_gain=100 * verdicts["ipex"].decode.change)


def compare(runs, *args: str) -> list[str]:
    return ["compare", runs["a"], runs["b"], "--store", runs["store"], *args]


def test_fail_above_exits_1_on_a_regression_beyond_it_and_0_below_it(runs, capsys):
    below, above = round(runs["drop"] - 1, 1), round(runs["drop"] + 1, 1)
    assert main(compare(runs, "--fail-above", str(below))) == 1
    err = capsys.readouterr().err
    assert f"1 cell(s) regressed by more than {below}%" in err
    assert "environments differ: versions.onnxruntime: 1.32.0 -> 1.33.0" in err  # the upgrade, named

    assert main(compare(runs, "--fail-above", str(above))) == 0
    assert "regressed" not in capsys.readouterr().err
    # A faster cell is never a regression, however low the gate: ipex's gain does not trip --fail-above 0,
    # and onnxruntime's loss does.
    assert main(compare(runs, "--fail-above", "0")) == 1
    assert "1 cell(s) regressed by more than 0.0%" in capsys.readouterr().err


def test_without_fail_above_a_regression_still_exits_0(runs, capsys):
    """The gate is opt-in: a plain comparison reports, it does not fail."""
    assert main(compare(runs)) == 0
    out = capsys.readouterr().out
    assert "slower" in out and "faster" in out


def test_the_noise_floor_decides_what_counts_as_a_change(runs, capsys):
    """Below the measured changes the verdicts stand; above them (20% > ~14%) nothing is significant,
    so the same --fail-above 0 gate that fails at floor 0 passes."""
    assert main(compare(runs, "--format", "md", "--noise-floor", "0", "--fail-above", "0")) == 1
    low = capsys.readouterr().out
    assert "**1 slower**, **1 faster**" in low and "noise floor, 0.0% here (given: 0%)" in low

    high_floor = f"{max(runs['drop'], runs['ipex_gain']) + 5:.0f}"
    assert main(compare(runs, "--format", "md", "--noise-floor", high_floor, "--fail-above", "0")) == 0
    high = capsys.readouterr().out
    assert "**0 slower**, **0 faster**, 3 no significant change" in high
    assert f"(given: {high_floor}%)" in high
    assert "No cell changed its decode rate significantly." in high


def test_format_md_is_a_markdown_table_naming_the_regressed_cell(runs, capsys):
    assert main(compare(runs, "--format", "md")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Comparison: {runs['a']} → {runs['b']}")
    significant = out.split("## Significant changes", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in significant.splitlines() if ln.startswith("|")]
    assert rows[0].startswith("| model | backend · precision | batch | threads | decode tok/s | decode change |")
    assert set(rows[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()  # the rule
    body = {r.split(" | ")[1]: r for r in rows[2:]}
    assert set(body) == {"onnxruntime · fp32", "ipex · fp32"}
    assert body["onnxruntime · fp32"].rstrip(" |").endswith("slower")
    assert f"−{runs['drop']:.1f}%" in body["onnxruntime · fp32"]
    assert body["ipex · fp32"].rstrip(" |").endswith("faster")
    assert "─" not in out  # no terminal box drawing in the Markdown


@pytest.mark.parametrize("args, message", [
    (["--fail-above", "-1"], "--fail-above: -1.0 must not be negative"),
    (["--fail-above", "five"], "--fail-above: 'five' is not a number"),
    (["--noise-floor", "nan"], "--noise-floor: 'nan' is not a finite number"),
    (["--format", "html"], "invalid choice: 'html'"),
])
def test_bad_flags_are_one_line_and_exit_2(runs, capsys, args, message):
    assert main(compare(runs, *args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_an_unknown_run_is_one_line_and_exit_2(runs, capsys):
    assert main(["compare", runs["a"], "20990101-000000-beef", "--store", runs["store"]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "20990101-000000-beef" in err and "Traceback" not in err
