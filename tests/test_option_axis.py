"""Backend options as a sweep axis: part of a cell's identity when given (cells that differ only in
options are different cells), absent from it otherwise (stored ids and sweep keys unchanged), given
to each backend only where it takes them, and a typo or a bad value refused before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backends.base import Probe
from bench.cli import make_parser
from bench.cli.run import build_sweep
from bench.spec import CellSpec, cell_id
from bench.planner import Sweep, SweepError, plan
from reports.format import label

BACKENDS = ["eager", "int8", "onnxruntime"]


def _plan(**kwargs):
    sweep = Sweep(models=["tiny"], **kwargs)
    probes = {b: Probe(True, devices=("cpu",)) for b in sweep.backends}
    return plan(sweep, probes, available_bytes=2**36)


def test_a_cell_without_options_keeps_its_id_and_a_sweep_its_key():
    spec = CellSpec(model="tiny", backend="int8", precision="int8", device="cpu")
    assert spec.id == '["tiny", "int8", "int8", "cpu", 1, null, 32, 16]'  # the id stored runs carry
    assert "options" not in spec.identity()
    assert Sweep().key() == Sweep(options={}).key() == "e8da5300ec5f976f"  # as before the options axis
    assert Sweep(options={"int8_scheme": ["per_channel"]}).key() != Sweep().key()


def test_cells_that_differ_only_in_options_are_different_cells():
    a, b = (CellSpec(model="tiny", backend="int8", precision="int8", device="cpu", options={"int8_scheme": s})
            for s in ("per_tensor", "per_channel"))
    plain = CellSpec(model="tiny", backend="int8", precision="int8", device="cpu")
    assert len({a.id, b.id, plain.id}) == 3
    assert a.identity()["options"] == {"int8_scheme": "per_tensor"}
    assert cell_id(dict(a.to_dict())) == a.id  # a record's id reads the same from its stored fields
    assert "int8_scheme=per_channel" in b.label()
    assert label(dict(b.identity())) == "int8 · int8 · int8_scheme=per_channel"
    assert label(dict(plain.identity())) == "int8 · int8"


def test_plan_gives_each_backend_the_options_it_takes_at_each_precision():
    cells = _plan(backends=BACKENDS, precisions=["fp32", "int8", "int4"],
                  options={"int8_scheme": ["per_tensor", "per_channel"], "group_size": [32, 128]})
    runnable = {(c.spec.backend, c.spec.precision, json.dumps(c.spec.options, sort_keys=True))
                for c in cells if not c.skip_reason}
    assert runnable == {
        ("eager", "fp32", "{}"),  # takes neither: runs as without options, its id unchanged
        ("int8", "int8", '{"int8_scheme": "per_tensor"}'), ("int8", "int8", '{"int8_scheme": "per_channel"}'),
        ("int8", "int4", '{"group_size": 32}'), ("int8", "int4", '{"group_size": 128}'),
        ("onnxruntime", "fp32", "{}"),
        ("onnxruntime", "int8", '{"int8_scheme": "per_tensor"}'),
        ("onnxruntime", "int8", '{"int8_scheme": "per_channel"}'),
        ("onnxruntime", "int4", "{}"),  # int8_scheme is not an int4 option; group_size is int8's and OpenVINO's
    }
    assert len({c.key for c in cells}) == len(cells)


def test_an_option_no_backend_takes_or_a_bad_value_is_one_error():
    with pytest.raises(SweepError, match="--option block_sise: no backend of this sweep"):
        _plan(backends=["int8", "onnxruntime"], options={"block_sise": [32]})
    with pytest.raises(SweepError, match="backend 'int8' at int8: int8_scheme='per_row' is not one of"):
        _plan(backends=["int8"], precisions=["int8"], options={"int8_scheme": ["per_row"]})
    with pytest.raises(SweepError, match="block_size=3 must be a power of two"):
        _plan(backends=["onnxruntime"], precisions=["int4"], options={"block_size": [3]})


def _args(*argv):
    return make_parser().parse_args(["run", *argv])


def test_option_from_the_command_line_and_a_toml_options_table(tmp_path):
    sweep = build_sweep(_args("--model", "tiny", "--backend", "int8", "--option", "int8_scheme=per_tensor,per_channel",
                              "--option", "group_size=32"))
    assert sweep.options == {"int8_scheme": ["per_tensor", "per_channel"], "group_size": [32]}
    config = tmp_path / "sweep.toml"
    config.write_text('[sweep]\nmodel = "tiny"\nbackend = "onnxruntime"\n\n'
                      '[options]\nint8_scheme = ["per_tensor", "per_channel"]\nblock_size = "32,128"\n')
    sweep = build_sweep(_args("--config", str(config)))
    assert sweep.options == {"int8_scheme": ["per_tensor", "per_channel"], "block_size": [32, 128]}
    sweep = build_sweep(_args("--config", str(config), "--option", "block_size=64"))  # the command line wins
    assert sweep.options["block_size"] == [64]
    with pytest.raises(Exception, match="expected KEY=VALUE"):
        build_sweep(_args("--model", "tiny", "--option", "int8_scheme"))
    assert build_sweep(_args("--model", "tiny")).options == {}


def test_run_sweeps_per_tensor_and_per_channel_side_by_side(tmp_path):
    store = str(tmp_path / "bench.sqlite")
    done = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--model", "tiny", "--backend", "int8", "--precision", "int8",
         "--option", "int8_scheme=per_tensor,per_channel", "--threads", "1", "--prompt-len", "8", "--gen-len", "4",
         "--budget", "0.5", "--launches", "1", "--no-parity", "--store", store, "--json"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cells = {c["options"]["int8_scheme"]: c for c in json.loads(done.stdout)}
    assert set(cells) == {"per_tensor", "per_channel"}
    for scheme, c in cells.items():
        assert c["status"] == "ok" and c["backend_info"]["int8_scheme"] == scheme  # what really ran
    out = tmp_path / "report"
    report = subprocess.run([sys.executable, "-m", "bench.cli", "report", "--format", "md", "--out", str(out),
                             "--store", store], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = (out / "report.md").read_text()
    assert "int8 · int8 · int8_scheme=per_channel" in text and "int8 · int8 · int8_scheme=per_tensor" in text
