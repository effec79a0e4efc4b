"""The `bench` command: each command once for real, and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.cli import main


def bench(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `bench` as a user would: a separate process, its exit code and output."""
    done = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=900)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("args, message", [
    (["run", "--backend", "nope", "--model", "tiny"], "unknown backend 'nope'; valid backends: eager"),
    (["run", "--model", "gpt5"], "unknown model preset 'gpt5'; valid presets: tiny"),
    (["run", "--model", "tiny", "--batch", "0"], "--batch: 0 must be at least 1"),
    (["run", "--model", "tiny", "--batch", "-2"], "--batch"),
    (["run", "--model", "tiny", "--precision", "fp8"], "unknown precision 'fp8'"),
    (["run", "--model", "tiny", "--launches", "0"], "--launches"),
    (["run", "--checkpoint", "/no/such/dir"], "checkpoint directory '/no/such/dir' does not exist"),
    (["run", "--config", "/no/such.toml"], "does not exist"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--backend", "nope"], "unknown backend 'nope'"),
    (["generate", "--checkpoint", "/no/such/dir", "--prompt", "hi"], "does not exist"),
    (["generate", "--model", "tiny"], "exactly one of --prompt"),
    (["generate", "--model", "tiny", "--prompt-ids", "1,x"], "not a comma list of integers"),
    (["generate", "--model", "tiny", "--prompt-ids", "99999"], "outside the vocabulary"),
    (["generate", "--model", "tiny", "--prompt-ids", "1", "--max-new-tokens", "999"], "exceeds max_length=256"),
    (["generate", "--model", "tiny", "--prompt-ids", "1", "--top-p", "2"], "top_p=2.0 must be in (0, 1]"),
    (["generate", "--model", "tiny", "--prompt-ids", "1", "--temperature", "-0.5"],
     "--temperature -0.5 must not be negative"),
    (["runs", "--store", "/"], "is a directory"),
    (["bogus"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err


def test_width_not_divisible_by_heads_in_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="gpt2", n_layer=1, n_head=12, n_embd=100, vocab_size=64, n_positions=32)))
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "n_embd=100 is not divisible by n_head=12" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "lr=-1.0 must be positive"),
    (["--min-lr", "1"], "min_lr=1.0 must be in [0, lr="),
])
def test_bad_train_settings_are_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    argv = ["train", "--model", "tiny", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "s.sqlite")]
    assert main([*argv, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_every_boundary_error_is_an_input_error():
    """What bench.cli.main reports as bad input (exit 2) rather than as a bug (exit 1)."""
    from backends.base import UnsupportedPrecision
    from backends.registry import UnknownBackend
    from bench.scenarios.quality import QualityInputError
    from bench.store import StoreError, UnknownRun
    from bench.planner import SweepError
    from model.checkpoint import CheckpointError
    from model.corpus import CorpusError
    from model.errors import InputError
    from model.generate import GenerationError
    from model.gpt import ConfigError
    from model.tokenizer import TokenizerError
    from model.train import OutputDirError, TrainConfigError, TrainingDataError

    for cls in (ConfigError, CheckpointError, TokenizerError, GenerationError, CorpusError, OutputDirError,
                TrainConfigError, TrainingDataError, UnknownBackend, UnsupportedPrecision, SweepError, StoreError,
                UnknownRun, QualityInputError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError), cls


def test_an_unexpected_error_is_a_bug_with_a_traceback_and_exit_code_1(monkeypatch, capsys):
    """Only bad input is a usage error: a ValueError from inside a command is a bug, shown in full."""
    from bench.cli import results

    def broken(args):
        raise ValueError("boom")

    monkeypatch.setattr(results, "cmd_runs", broken)
    assert main(["runs"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: boom" in err


def test_bad_input_from_a_real_process_has_no_traceback():
    done = bench("run", "--backend", "nope", "--model", "tiny", check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown backend" in done.stderr


def test_info_lists_machine_and_every_backend():
    from backends.registry import names

    info = json.loads(bench("info", "--json", "--no-roofline").stdout)
    assert info["fingerprint"]["cpu"]["cores_logical"] >= 1
    assert set(info["backends"]) == set(names())
    assert info["backends"]["eager"]["available"] is True
    for probe in info["backends"].values():
        assert probe["available"] or probe["reason"]  # unavailable always says why


def test_generate_json_matches_the_library_greedy_tokens():
    import torch

    from backends.eager import EagerBackend
    from model.generate import generate
    from model.gpt import build_model, get_config

    out = json.loads(bench("generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
                           "--json").stdout)
    assert len(out["token_ids"]) == 6
    backend = EagerBackend()
    backend.load(build_model(get_config("tiny"), seed=0))
    with torch.no_grad():
        expected = generate(backend, [[1, 2, 3]], 6, greedy=True)[0]
    assert out["token_ids"] == expected


def test_temperature_zero_is_greedy(capsys):
    """--temperature 0 means greedy decoding, as in llama.cpp; it used to sample at temperature 1."""
    args = ["generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]
    assert main([*args, "--greedy"]) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    for seed in ("1", "2"):
        assert main([*args, "--temperature", "0", "--seed", seed]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == greedy


def test_generate_sampling_is_reproducible_with_a_seed():
    args = ("generate", "--model", "tiny", "--prompt", "hello", "--max-new-tokens", "8", "--temperature",
            "1.5", "--top-k", "50", "--seed", "7", "--json")
    assert json.loads(bench(*args).stdout)["token_ids"] == json.loads(bench(*args).stdout)["token_ids"]


def test_run_stores_cells_then_runs_export_and_resume(tmp_path):
    store = str(tmp_path / "bench.sqlite")
    sweep = ("run", "--model", "tiny", "--backend", "eager", "--precision", "fp32,int8", "--batch", "1,2",
             "--threads", "1", "--prompt-len", "8", "--gen-len", "4", "--budget", "1", "--launches", "2", "--store", store)
    cells = json.loads(bench(*sweep, "--json").stdout)
    by = {(c["precision"], c["batch"]): c for c in cells}
    assert by[("fp32", 1)]["status"] == by[("fp32", 2)]["status"] == "ok"
    assert by[("int8", 1)]["status"] == "skipped" and "does not support" in by[("int8", 1)]["reason"]
    assert by[("fp32", 2)]["decode_tok_s"] > 0 and by[("fp32", 2)]["parity"]["passed"]
    assert by[("fp32", 2)]["launches"] == 2 and len(by[("fp32", 2)]["launch_medians"]["tpot_ms"]) == 2

    exported = json.loads(bench("export", "latest", "--format", "json", "--store", store).stdout)
    assert exported["run_id"] in bench("runs", "--store", store).stdout
    exported_cells = exported["cells"]
    assert len(exported_cells) == 4
    csv_text = bench("export", "latest", "--format", "csv", "--store", store).stdout
    assert csv_text.splitlines()[0].count(",") > 10 and len(csv_text.splitlines()) == 5

    resumed = bench(*sweep, "--resume", "--json")
    assert "4 of 4 launches already stored" in resumed.stderr
    assert len(json.loads(resumed.stdout)) == 4  # nothing ran twice


def test_export_of_an_unknown_run_is_one_line(tmp_path, capsys):
    assert main(["export", "nope", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_threads_all_means_one_per_physical_core(monkeypatch):
    from bench.machine import environment
    from bench.planner import parse_threads

    monkeypatch.setattr(environment, "all_threads", lambda: 3)
    assert parse_threads("all") == [3]
    assert parse_threads("1,all") == [1, 3]
    assert parse_threads(["all"]) == [3]  # from a TOML list


# Every command and flag of `bench --help` before bench/ was laid out by concept (commit 5087930);
# none may disappear. New flags since: run --confirm, serve --chats; new commands since: COMMANDS_SINCE, after them.
FLAGS_BEFORE = {
    'info': ['--json', '--no-roofline', '--remeasure', '--threads'],
    'run': ['--address', '--backend', '--batch', '--budget', '--checkpoint', '--config', '--executor', '--gen-len', '--grad-checkpointing', '--json', '--launches', '--max-batch', '--model', '--name', '--no-parity', '--num-requests', '--on', '--option', '--plant-slowdown', '--precision', '--prompt-len', '--rate', '--resume', '--scenario', '--seq-len', '--slo', '--store', '--target-ci', '--threads', '--timeout', '--train-steps', '--warmup-steps'],
    'generate': ['--backend', '--checkpoint', '--greedy', '--json', '--max-new-tokens', '--model', '--num-beams', '--precision', '--prompt', '--prompt-ids', '--repetition-penalty', '--seed', '--temperature', '--threads', '--top-k', '--top-p', '--weights-seed'],
    'convert': ['--checkpoint', '--force', '--model', '--out', '--seed', '--to'],
    'runs': ['--store'],
    'export': ['--format', '--out', '--store', '--to'],
    'report': ['--format', '--out', '--store'],
    'train': ['--batch-size', '--checkpoint-every', '--config', '--context', '--corpus', '--eval-every', '--grad-accum', '--grad-checkpointing', '--grad-clip', '--json', '--keep-last', '--lr', '--max-bytes', '--min-lr', '--model', '--name', '--out', '--patience', '--precision', '--resume', '--seed', '--steps', '--store', '--threads', '--warmup-steps', '--weight-decay'],
    'quality': ['--backend', '--checkpoint', '--context', '--corpus', '--json', '--max-tokens', '--option', '--precision', '--stride', '--threads'],
    'serve': ['--backend', '--checkpoint', '--drain-timeout', '--host', '--max-batch', '--model', '--port', '--precision', '--queue-size', '--threads', '--timeout'],
    'load': ['--burstiness', '--duration', '--gen-len', '--json', '--max-concurrency', '--name', '--num-requests', '--prompt-len', '--rate', '--request-timeout', '--seed', '--slo', '--store', '--url'],
    'quantize': ['--backend', '--checkpoint', '--group-size', '--int8-scheme', '--json', '--option', '--out', '--precision'],
    'compare': ['--fail-above', '--format', '--noise-floor', '--store'],
    'dashboard': ['--host', '--poll', '--port', '--store'],
}
COMMANDS_SINCE = ['inspect']


def test_every_command_and_flag_of_the_earlier_cli_is_still_there():
    import argparse

    from bench.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(FLAGS_BEFORE) + COMMANDS_SINCE  # the same commands, in the same order
    for name, flags in FLAGS_BEFORE.items():
        now = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert set(flags) <= now, (name, sorted(set(flags) - now))
