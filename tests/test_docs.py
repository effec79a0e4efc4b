"""The README documents what the tool stores, and the default sweep is valid."""

from pathlib import Path

from bench.results.schema import CELL_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_cell_field():
    readme = (ROOT / "README.md").read_text()
    missing = [f for f in CELL_FIELDS if f"| `{f}` |" not in readme]
    assert not missing, f"README's cell-record table lacks {missing}"


def test_default_sweep_parses():
    from bench.planner import load_toml

    values = load_toml(ROOT / "sweeps" / "default.toml")
    assert values["backend"] == "all" and values["model"]


def test_make_bench_trains_a_valid_config():
    import tomllib

    from model.gpt import get_config
    from model.train import TrainConfig

    values = dict(tomllib.loads((ROOT / "sweeps" / "train-small.toml").read_text())["train"])
    get_config(values.pop("model"))
    assert TrainConfig.from_dict(values).steps > 0
    assert "runs/small-trained" in (ROOT / "sweeps" / "default.toml").read_text()
    assert "--out $(RUNS)/small-trained" in (ROOT / "Makefile").read_text()
