"""Training as a sweep scenario (``bench run --scenario train``): real cells, skips, inputs, reports, resume.

The real cells train the tiny preset on a handful of 2 x 16-token batches in their own
processes, one thread each, so their losses reproduce exactly across processes.
"""

from __future__ import annotations

import math

import pytest

import bench.planner
from backends.base import Probe
from bench.cli import main
from bench.results.records import cell_record
from bench.spec import CellSpec, cell_id
from bench.store import Store
from bench.planner import Sweep, estimate_train_peak_bytes, plan
from bench.sweep import run_sweep
from model.gpt import get_config
from reports.markdown import render_markdown

AVAILABLE = Probe(True)
FP = {"cpu": {"brand": "Test CPU", "isa": {"avx2": True}}, "versions": {"torch": "2.8.0"}, "python": "3.11"}


def no_sentinel(threads):
    return {"decode_ms": 1.0, "gemv_gb_s": 10.0}


def train_sweep(**kw) -> Sweep:
    base = dict(scenario="train", models=["tiny"], backends=["eager"], precisions=["fp32"], batches=[2],
                threads=[1], seq_lens=[16], grad_checkpointing=[False], launches=1, train_steps=2,
                warmup_steps=1, timeout_s=300.0)
    base.update(kw)
    return Sweep(**base)


def test_train_cells_run_through_the_sweep_into_the_store_and_checkpointing_keeps_the_losses(tmp_path):
    sweep = train_sweep(backends=["eager", "onnxruntime"], grad_checkpointing=[False, True])
    probes = {"eager": AVAILABLE, "onnxruntime": AVAILABLE}
    with Store(tmp_path / "bench.sqlite") as store:
        run_id = run_sweep(sweep, store, probes, FP, sentinel=no_sentinel)
        cells = store.get_run(run_id)["cells"]
    by = {(c["backend"], c["grad_checkpointing"]): c for c in cells}
    assert len(cells) == 4
    for gc in (False, True):
        c = by[("eager", gc)]
        assert c["status"] == "ok", c.get("reason")
        assert c["scenario"] == "train" and c["seq_len"] == 16
        assert c["train_tok_s"] > 0 and c["step_ms"]["n"] == 2
        assert c["train_tok_s"] == pytest.approx(2 * 16 / (c["step_ms"]["median"] / 1e3))
        # raw steps kept as launches > groups of steps > steps
        assert len(c["samples"]["step_ms"]) == 1 and sum(map(len, c["samples"]["step_ms"][0])) == 2
        assert all(math.isfinite(x) for x in c["losses"]) and len(c["losses"]) == 1 + 2 + 1
        assert c["loss_before"] == pytest.approx(math.log(get_config("tiny").vocab_size), rel=0.1)
        assert c["loss_after"] < c["loss_before"]  # the same batch, scored again after the updates
        assert c["state_mb"] > 0 and c["activation_mb"] is not None and c["peak_rss_mb"] >= c["state_mb"]
        assert c["grads_mb"] == pytest.approx(c["weights_mb"]) and c["optimizer_mb"] == pytest.approx(2 * c["weights_mb"], rel=1e-3)  # and a step count per tensor
    # recomputing activations in the backward pass changes no number of the trajectory at fp32
    assert by[("eager", True)]["losses"] == pytest.approx(by[("eager", False)]["losses"], rel=1e-6, abs=1e-6)
    assert by[("eager", True)]["cell_id"] != by[("eager", False)]["cell_id"]
    for gc in (False, True):
        skipped = by[("onnxruntime", gc)]
        assert skipped["status"] == "skipped"
        assert "cannot train" in skipped["reason"] and "no backward pass" in skipped["reason"]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "int8"])
def test_backends_that_cannot_train_are_skipped_with_the_reason(backend):
    (cell,) = plan(train_sweep(backends=[backend], precisions=[]), {backend: AVAILABLE})
    assert cell.spec.scenario == "train"
    assert cell.skip_reason.startswith(f"backend {backend!r} cannot train: ")


def test_a_precision_a_backend_does_not_train_in_is_skipped_and_eager_trains_bf16_by_autocast():
    cells = plan(train_sweep(precisions=["fp16", "bf16"]), {"eager": AVAILABLE})
    reasons = {c.spec.precision: c.skip_reason for c in cells}
    assert "does not train in precision 'fp16'" in reasons["fp16"]
    assert reasons["bf16"] == ""


def test_inference_cells_and_sweep_keys_are_unchanged_by_the_training_fields():
    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu")
    assert spec.id == cell_id({f: getattr(spec, f) for f in ("model", "backend", "precision", "device", "batch",
                                                               "threads", "prompt_len", "gen_len")})
    assert "seq_len" not in spec.identity()
    train = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", scenario="train", seq_len=16)
    assert train.identity()["seq_len"] == 16 and train.id.startswith('["train"')
    assert Sweep().key() == Sweep(seq_lens=[64], train_steps=3).key()  # train fields ignored for inference
    assert train_sweep().key() != train_sweep(seq_lens=[32]).key()


def test_the_memory_guard_counts_training_state_and_activations():
    gpt2 = get_config("gpt2")
    off = estimate_train_peak_bytes(gpt2, "fp32", 4, 512, False)
    on = estimate_train_peak_bytes(gpt2, "fp32", 4, 512, True)
    assert off > on > 4 * 4 * gpt2.n_params  # weights, gradients, two Adam moments, at least
    (cell,) = plan(train_sweep(models=["gpt2"], batches=[4], seq_lens=[512]), {"eager": AVAILABLE},
                   available_bytes=4 * 1024**3)
    assert "estimated peak memory" in cell.skip_reason


@pytest.mark.parametrize("args, message", [
    (["--scenario", "train", "--seq-len", "999"], "--seq-len 999 exceeds tiny's context length 256"),
    (["--scenario", "train", "--grad-checkpointing", "maybe"], "--grad-checkpointing: 'maybe' is not off or on"),
    (["--scenario", "train", "--seq-len", "0"], "--seq-len: 0 must be at least 1"),
    (["--scenario", "fly"], "argument --scenario: invalid choice: 'fly'"),
    (["--seq-len", "64"], "--seq-len applies to --scenario train only"),
    (["--scenario", "train", "--train-steps", "0"], "--train-steps"),
])
def test_bad_training_values_are_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert main(["run", "--model", "tiny", "--store", str(tmp_path / "s.sqlite"), *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_a_toml_scenario_is_checked_too(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[sweep]\nscenario = "fly"\nmodel = "tiny"\n')
    assert main(["run", "--config", str(path), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "--scenario: 'fly' is not one of inference, serve, train" in capsys.readouterr().err


def test_training_axes_come_from_a_toml_sweep(tmp_path):
    from bench.cli import make_parser
    from bench.cli.run import build_sweep

    path = tmp_path / "train.toml"
    path.write_text('[sweep]\nscenario = "train"\nmodel = "tiny"\nseq_len = [16, 32]\n'
                    'grad_checkpointing = ["off", "on"]\ntrain_steps = 3\n')
    sweep = build_sweep(make_parser().parse_args(["run", "--config", str(path)]))
    assert (sweep.scenario, sweep.seq_lens, sweep.grad_checkpointing, sweep.train_steps) == \
        ("train", [16, 32], [False, True], 3)
    assert len(plan(sweep, {"eager": AVAILABLE})) == 4


def test_a_train_sweep_resumes_from_its_last_stored_launch(tmp_path, monkeypatch):
    import bench.executors.cell

    real = bench.executors.cell.run_cell
    calls = []

    def interrupt_second(spec, timeout):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(spec)
        return real(spec, timeout)

    sweep = train_sweep(launches=2)
    with Store(tmp_path / "bench.sqlite") as store:
        monkeypatch.setattr(bench.executors.cell, "run_cell", interrupt_second)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep, store, {"eager": AVAILABLE}, FP, sentinel=no_sentinel)
        monkeypatch.setattr(bench.executors.cell, "run_cell", real)
        run_id = run_sweep(sweep, store, {"eager": AVAILABLE}, FP, sentinel=no_sentinel, resume=True)
        (cell,) = store.get_run(run_id)["cells"]
        assert len(store.launches(run_id)) == 2
    # the first launch is kept, not run again; the interrupted round stays recorded, so the next is round 2
    assert cell["status"] == "ok" and cell["launches"] == 2 and cell["launch_rounds"] == [0, 2]
    assert len(cell["launch_medians"]["step_ms"]) == 2


# -- reports, on synthetic records ------------------------------------------------------------


def _launch(step_ms: float, activation: float, peak: float, loss: float = 6.0, blocks: float | None = None) -> dict:
    return dict(status="ok", reason="", n_params=1_000_000, precision="fp32", device="cpu", build_s=0.1,
                load_s=0.1, weights_mb=4.0, grads_mb=4.0, optimizer_mb=8.0, loss_before=loss, loss_after=loss - 0.5,
                losses=[loss, loss, loss - 0.5], data="synthetic", lr=1e-3, optimizer="AdamW",
                activation_method="VmHWM reset", backend_info={}, peak_rss_mb=peak, state_mb=peak - activation,
                activation_mb=activation, blocks_activation_mb=blocks, device_peak_mb=None, device_activation_mb=None, warmup_reps=1,
                warmup_settled=True, samples=dict(step_ms=[[step_ms, step_ms * 1.01], [step_ms * 0.99, step_ms]]),
                wall_s=1.0)


def _train_record(precision: str, gc: bool, step_ms: float, activation: float, peak: float, batch: int = 2,
                  blocks: float | None = None) -> dict:
    spec = CellSpec(model="tiny", backend="eager", precision=precision, device="cpu", batch=batch, threads=1,
                    scenario="train", seq_len=16, grad_checkpointing=gc)
    launches = [dict(_launch(step_ms, activation, peak, blocks=blocks), precision=precision, round=i) for i in range(2)]
    return cell_record(spec, launches, 2, 1_000_000)


def _inference_record() -> dict:
    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", batch=2, threads=1,
                    prompt_len=4, gen_len=3)
    launch = dict(status="ok", reason="", n_params=1_000_000, precision="fp32", device="cpu", load_s=0.1,
                  first_call_ms=1.0, model_mb=1.0, weights_mb=4.0, warmup_reps=1, warmup_settled=True,
                  peak_rss_mb=500.0, device_peak_mb=None, kv_cache_mb=0.1, parity={"reference": True, "passed": True},
                  backend_info={}, samples=dict(ttft_ms=[4.0, 4.0], tpot_ms=[[2.0, 2.0], [2.0, 2.0]], e2e_ms=[8.0, 8.0]))
    return cell_record(spec, [launch], 1, 1_000_000)


def _run(cells: list[dict]) -> dict:
    return dict(run_id="r1", created_at="2026-12-01T00:00:00", fingerprint_id="fp", fingerprint=FP, cells=cells)


def test_report_shows_throughput_checkpointing_and_training_against_inference():
    cells = [_train_record("fp32", False, 10.0, 100.0, 900.0, blocks=50.0),
             _train_record("fp32", True, 13.0, 40.0, 840.0, blocks=10.0), _inference_record()]
    md = render_markdown([_run(cells)])
    assert "## Training tiny" in md and "## Gradient checkpointing: memory saved, time paid" in md
    # 2 x 16 tokens per 10 ms step: 3,200 tokens/s
    assert "| eager · fp32 · ckpt off | **3,200" in md
    assert ("| tiny | eager · fp32 | 2 | 16 | 1 | 100 MiB | 40.0 MiB | ×0.40 | ×0.20 | ×0.93 | 10.0 | 13.0 | ×1.30 |"
            in md)
    # training 3,200 tok/s against a prefill of 2 x 4 tokens in 4 ms: 2,000 tok/s
    assert "| tiny | eager · fp32 | 1 | 2 × 16 | **3,200 (" in md and "| 2 × 4 | 2,000 | 1,000 | ×1.60 |" in md
    # the inference sections still see only the inference cell
    assert "All 1 cells" in md


def test_a_training_only_run_renders_in_both_formats():
    from reports.html import render_html

    cells = [_train_record("fp32", False, 10.0, 100.0, 900.0), _train_record("bf16", False, 5.0, 60.0, 700.0)]
    md = render_markdown([_run(cells)])
    assert "## Training tiny" in md and "Best configuration" not in md
    assert "Gradient checkpointing" not in md and "Training against inference" not in md
    html = render_html([_run(cells)])
    assert "Training tiny" in html and "6,400" in html and "<svg" not in html  # one batch: nothing to chart
    cells.append(_train_record("fp32", False, 18.0, 190.0, 990.0, batch=4))
    html = render_html([_run(cells)])
    assert html.count("<svg") == 1 and "Training tokens/s against batch" in html


def test_report_lists_training_cells_that_did_not_run():
    spec = CellSpec(model="tiny", backend="int8", precision="int8", device="cpu", scenario="train", seq_len=16)
    from bench.results.records import skipped_record

    cells = [_train_record("fp32", False, 10.0, 100.0, 900.0),
             skipped_record(spec, "backend 'int8' cannot train: no backward pass", 1_000_000)]
    md = render_markdown([_run(cells)])
    assert "## Training cells that did not run" in md and "backend 'int8' cannot train: no backward pass" in md


def test_sweep_module_plans_no_training_variants_for_inference():
    assert bench.planner.scenario_variants(Sweep()) == [{}]


def test_a_non_finite_loss_fails_the_cell_with_the_reason(monkeypatch):
    import bench.scenarios.train as mt

    real = mt.train_step
    calls = []

    def diverging(*args, **kwargs):
        loss, norm = real(*args, **kwargs)
        calls.append(loss)
        return (float("nan") if len(calls) == 2 else loss), norm

    monkeypatch.setattr(mt, "train_step", diverging)
    spec = CellSpec(model="tiny", backend="eager", precision="bf16", device="cpu", batch=2, scenario="train",
                    seq_len=16, train_steps=2, warmup_steps=1)
    with pytest.raises(mt.TrainingDiverged, match=r"the loss is nan at step 2 of the launch \(bf16\)"):
        mt.measure_train(spec)


def test_compare_does_not_judge_training_cells_by_inference_metrics():
    from bench.results.compare import NOT_COMPARABLE, compare_runs

    base = _run([_train_record("fp32", False, 10.0, 100.0, 900.0)])
    new = dict(_run([_train_record("fp32", False, 20.0, 100.0, 900.0)]), run_id="r2")
    (change,) = compare_runs(base, new).cells
    assert change.verdict == NOT_COMPARABLE and "training cell" in change.note


def test_the_shipped_train_sweep_parses_and_plans():
    from pathlib import Path

    from bench.cli import make_parser
    from bench.cli.run import build_sweep

    path = Path(__file__).resolve().parents[1] / "sweeps" / "train.toml"
    sweep = build_sweep(make_parser().parse_args(["run", "--config", str(path)]))
    assert sweep.scenario == "train" and sweep.grad_checkpointing == [False, True]
    cells = plan(sweep, {b: AVAILABLE for b in sweep.backends}, available_bytes=64 * 1024**3)
    assert len(cells) == 3 * 2 * 2 * 2 * 2 * len(sweep.threads) and not any(c.skip_reason for c in cells)


@pytest.mark.parametrize("backend, precision", [("mkl", "bf16"), ("ipex", "bf16")])
def test_torch_backends_train_in_their_precisions(backend, precision):
    from backends import registry
    from bench.scenarios.train import measure_train

    probe = registry.probe(backend)
    if not probe.available:
        pytest.skip(f"{backend} unavailable: {probe.reason}")
    spec = CellSpec(model="tiny", backend=backend, precision=precision, device="cpu", batch=2, scenario="train",
                    seq_len=16, train_steps=2, warmup_steps=1)
    out = measure_train(spec)
    assert out["precision"] == precision and out["backend_info"]["backend"] == backend
    assert all(math.isfinite(x) for x in out["losses"]) and len(out["losses"]) == 4
    assert out["loss_before"] == pytest.approx(math.log(get_config("tiny").vocab_size), rel=0.1)


def test_one_group_of_steps_has_no_interval_rather_than_a_point():
    spec = CellSpec(model="tiny", backend="eager", precision="fp32", device="cpu", batch=2, scenario="train", seq_len=16)
    launch = dict(_launch(10.0, 1.0, 10.0), samples=dict(step_ms=[[10.0, 11.0]]))
    record = cell_record(spec, [launch], 1, 1)
    assert record["train_tok_s"] == pytest.approx(32 / 0.0105) and record["train_tok_s_ci"] is None
    assert "| eager · fp32 · ckpt off | **3,048**<br>step 10.5 ms" in render_markdown([_run([record])])
