"""The one planner decides what runs before any work: targets, quantised checkpoints, lengths, paths, parts.

Found as a new user would: ``bench run --checkpoint Q --backend all`` on a quantised checkpoint
planned every cell and skipped every one; an over-long ``--prompt-len`` was refused only after the
roofline had been measured; an unwritable ``--store`` was a traceback. Each is one line and exit 2
now, or a plan that runs, checked here before anything is measured.
"""

from __future__ import annotations

import os

import pytest

from backends import registry
from backends.base import Probe
from bench.cli import main
from bench.planner import (Sweep, SweepError, check_store, every_precision, expand_backends, fastest_candidates,
                           load_toml, plan,
                           plan_targets, sweep_from_config)
from bench.quantize import quantize_checkpoint
from model.checkpoint import save_checkpoint

AVAILABLE = Probe(True, devices=("cpu",))


def probes(names, unavailable=()):
    return {n: Probe(False, reason="not here", fix="pip install it") if n in unavailable else AVAILABLE
            for n in names}


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory, tiny_model):
    source = tmp_path_factory.mktemp("fp32")
    save_checkpoint(tiny_model, source)
    out = tmp_path_factory.mktemp("q") / "int8"
    quantize_checkpoint(source, "int8", out)
    return out


def test_a_quantised_checkpoint_with_backend_all_plans_its_own_target(int8_checkpoint):
    names = registry.names()
    sweep = Sweep(models=[str(int8_checkpoint)], backends=names, checkpoint=True, batches=[1, 2])
    cells = plan(sweep, probes(names), available_bytes=64 * 2**30)
    runnable = [c for c in cells if not c.skip_reason]
    assert {(c.spec.backend, c.spec.precision, c.spec.batch) for c in runnable} == {("int8", "int8", 1),
                                                                                     ("int8", "int8", 2)}
    skipped = {c.spec.backend for c in cells if c.skip_reason}
    assert skipped == set(names) - {"int8"}
    assert all("quantised checkpoint for int8/int8" in c.skip_reason for c in cells if c.skip_reason)


def test_a_quantised_checkpoint_refused_for_a_backend_that_never_reads_it(int8_checkpoint):
    with pytest.raises(SweepError, match="never dequantised"):
        sweep_from_config({"checkpoint": str(int8_checkpoint), "backend": "onnxruntime"})
    # its own backend without a precision: the checkpoint's precision is planned
    sweep = sweep_from_config({"checkpoint": str(int8_checkpoint), "backend": "int8"})
    targets = plan_targets(sweep.backends, sweep.precisions, probes(["int8"]), quantized=("int8", "int8", "per_tensor"))
    assert [(t.backend, t.precision, t.reason) for t in targets] == [("int8", "int8", "")]


def test_targets_keep_an_unavailable_backend_and_an_unsupported_precision_with_the_reason():
    targets = plan_targets(["eager", "onnxruntime"], ["fp32", "int4"], probes(["eager", "onnxruntime"], ["onnxruntime"]))
    reasons = {(t.backend, t.precision): t.reason for t in targets}
    assert reasons[("eager", "fp32")] == ""
    assert "does not support" in reasons[("eager", "int4")] or "int4" in reasons[("eager", "int4")]
    assert reasons[("onnxruntime", "fp32")].startswith("backend unavailable: not here (fix: pip install it)")


def test_precision_all_is_every_precision_a_backend_runs_here():
    cls = registry.get_backend_class("openvino")
    assert every_precision(cls, {"avx512_bf16": False, "amx_bf16": False}) == ["fp32", "int8", "int4"]
    assert "bf16" in every_precision(cls, {"avx512_bf16": True, "amx_bf16": True})
    assert every_precision(registry.get_backend_class("eager"), {}) == ["fp32"]
    sweep = sweep_from_config({"model": "tiny", "backend": "onnxruntime,int8", "precision": "all"})
    cells = plan(sweep, probes(sweep.backends), available_bytes=64 * 2**30, isa={})
    assert {(c.spec.backend, c.spec.precision) for c in cells} == {
        ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", "int4"), ("int8", "int8"), ("int8", "int4")}


def test_precision_fastest_leaves_fp32_out_only_beside_a_native_bf16():
    native, avx2 = {"avx512_bf16": True, "amx_bf16": True}, {"avx512_bf16": False, "amx_bf16": False}
    get = registry.get_backend_class
    assert fastest_candidates(get("openvino"), native) == ["bf16", "int8", "int4"]
    assert fastest_candidates(get("openvino"), avx2) == ["fp32", "int8", "int4"]
    assert fastest_candidates(get("mkl"), native) == ["bf16"] and fastest_candidates(get("mkl"), avx2) == ["fp32"]
    assert fastest_candidates(get("onnxruntime"), native) == ["fp32", "int8", "int4"]  # no native float of its own
    assert fastest_candidates(get("int8"), native) == ["int8", "int4"]
    assert fastest_candidates(get("eager"), native) == ["fp32"]  # the reference
    sweep = sweep_from_config({"model": "tiny", "backend": "mkl,int8", "precision": "fastest"})
    cells = plan(sweep, probes(sweep.backends), available_bytes=64 * 2**30, isa=avx2)
    assert {(c.spec.backend, c.spec.precision) for c in cells} == {("mkl", "fp32"), ("int8", "int8"), ("int8", "int4")}


def test_backend_keywords_spell_out_ours_and_the_peers():
    ours, peers = expand_backends(["ours"]), expand_backends(["peers"])
    assert set(ours) | set(peers) == set(registry.names()) and not set(ours) & set(peers)
    assert all(registry.is_peer(p) for p in peers) and "eager" in ours
    assert expand_backends(["all"]) == registry.names()
    with pytest.raises(Exception, match="valid backends"):
        expand_backends(["nope"])


def test_an_over_long_prompt_is_refused_before_anything_is_measured(monkeypatch, tmp_path, capsys):
    """No probe, no roofline, no store: the planner refuses first."""
    def never(*a, **k):
        raise AssertionError("measured or probed before the sweep was validated")

    monkeypatch.setattr(registry, "probe_all", never)
    monkeypatch.setattr(registry, "probe_isolated", never)
    monkeypatch.setattr("bench.machine.roofline.roofline_for", never)
    store = tmp_path / "s.sqlite"
    rc = main(["run", "--model", "tiny", "--backend", "eager", "--prompt-len", "1000", "--store", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "exceeds tiny's context length" in err[0]
    assert not store.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: an unwritable directory cannot be made")
def test_an_unwritable_store_is_one_line_as_a_user(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc = main(["run", "--model", "tiny", "--backend", "eager", "--store", str(locked / "s.sqlite")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not writable" in err[0]


@pytest.mark.parametrize("where", ["a-file/under-it.sqlite", "a-dir", "/proc/self/bench/s.sqlite", "/proc/s.sqlite"])
def test_a_store_path_that_cannot_be_a_file_is_one_line(tmp_path, capsys, monkeypatch, where):
    """Checked before anything runs, even as root: a store under a file, a directory as the store,
    a place no one can write (procfs)."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    monkeypatch.setattr(registry, "probe_all", lambda *a, **k: pytest.fail("probed before the store was checked"))
    rc = main(["run", "--model", "tiny", "--backend", "eager", "--store", str(tmp_path / where)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "store" in err[0], err


def test_check_store_accepts_a_new_file_in_a_new_directory(tmp_path):
    assert check_store(tmp_path / "new" / "deeper" / "s.sqlite") == tmp_path / "new" / "deeper" / "s.sqlite"


def test_parts_of_a_sweep_file_inherit_the_top_and_run_as_one_plan(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('[sweep]\nmodel = ["tiny"]\nbackend = ["eager", "int8"]\nbatch = [1, 4]\nlaunches = 2\n\n'
                      '[[sweep.also]]\nbackend = "peers"\nbatch = [1]\n\n'
                      '[[sweep.also]]\nbackend = ["eager"]\nbatch = [1]\n')
    sweep = sweep_from_config(load_toml(config))
    assert [p.batches for p in sweep.also] == [[1], [1]] and sweep.also[0].models == ["tiny"]
    names = registry.names()
    cells = plan(sweep, probes(names), available_bytes=64 * 2**30, isa={})
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))  # eager batch 1, in the top and the last part, is planned once
    peers = {c.spec.backend for c in cells if registry.is_peer(c.spec.backend)}
    assert peers == set(expand_backends(["peers"])) and all(
        c.spec.batch == 1 for c in cells if registry.is_peer(c.spec.backend))
    assert {c.spec.batch for c in cells if c.spec.backend == "int8"} == {1, 4}
    # the command line overrides every part
    over = sweep_from_config(load_toml(config), {"batch": "2"})
    assert over.batches == [2] and all(p.batches == [2] for p in over.also)
    assert sweep.key() != over.key() and sweep.key() == sweep_from_config(load_toml(config)).key()


def test_a_part_may_not_set_what_the_whole_run_shares(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('[sweep]\nmodel = ["tiny"]\n\n[[sweep.also]]\nlaunches = 5\n')
    with pytest.raises(SweepError, match="'launches' applies to the whole run"):
        sweep_from_config(load_toml(config))
    config.write_text('[sweep]\nmodel = ["tiny"]\n\n[[sweep.also]]\nmodle = "tiny"\n')
    with pytest.raises(SweepError, match="unknown key 'modle'"):
        sweep_from_config(load_toml(config))


def test_a_sweep_without_parts_keeps_its_resume_key():
    """Runs stored before parts existed still resume: a one-part sweep's key is what it was
    (the values computed by the code before the planner, at commit 5087930)."""
    assert Sweep().key() == "e8da5300ec5f976f"
    assert Sweep(models=["gpt2"], backends=["eager", "int8"], batches=[1, 4]).key() == "2af0b8b0a0d31e89"


def test_every_command_applies_one_quantised_checkpoint_rule(int8_checkpoint, capsys):
    """bench run and bench quality refuse a quantised checkpoint asked for elsewhere alike."""
    for argv in (["run", "--checkpoint", str(int8_checkpoint), "--backend", "onnxruntime"],
                 ["quality", "--checkpoint", str(int8_checkpoint), "--backend", "eager"],
                 ["quality", "--checkpoint", str(int8_checkpoint), "--backend", "int8", "--precision", "int4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "quantised checkpoint for --backend int8 --precision int8" in err[0], err
        assert "never dequantised" in err[0]
