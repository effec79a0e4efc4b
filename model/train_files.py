"""A training run's directory on disk: its checkpoints and its small files.

    run.json             what the run is (its key, config, corpus and tokenizer recipe; ``RUN_FORMAT``)
    metrics.jsonl        one record per step (loss, learning rate, validation loss when evaluated)
    step-NNNNNN/         a checkpoint: weights (or LoRA adapters alone), tokenizer, training_state.pt
                         (optimizer, scheduler, RNG states, the best so far), the last ``keep_last`` kept
    best/, the top       the best weights by validation loss, and the last ones

Every directory is written beside its place and renamed into it (``swap_into_place``), and every
JSON file likewise, so a run killed at any moment leaves complete checkpoints only: ``--resume``
and a worker count other than the one that wrote it (model/distributed.py) start from
``latest_checkpoint``. The loop that writes them is model/train.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.errors import InputError
from model.gpt import GPT

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "training_state.pt"
RUN_FORMAT = "llm-backend-bench/train-run"


class OutputDirError(InputError):
    """The output directory cannot take this run; nothing in it was changed."""


# -- checkpoints -------------------------------------------------------------------------

def write_weights(model: GPT, directory: Path) -> None:
    """The model's weights into ``directory``: a whole checkpoint, or with LoRA the adapters alone."""
    from model.lora import has_lora, save_adapter

    if has_lora(model):
        save_adapter(model, directory)
    else:
        save_checkpoint(model, directory)


def save_weights(directory: Path, model: GPT, tokenizer, replace: bool = True) -> None:
    """Weights (and the tokenizer) into ``directory``: a fresh one renamed into place, or,
    with ``replace=False``, the files written into an existing directory (the run's top)."""
    if not replace:
        write_weights(model, directory)
        if tokenizer is not None:
            tokenizer.save(directory)
        return
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    swap_into_place(tmp, directory)


def save_step(out_dir: Path, step: int, model: GPT, optimizer, scheduler, data_gen: torch.Generator,
                     best: dict, tokenizer, keep_last: int) -> None:
    final = out_dir / f"step-{step:06d}"
    tmp = out_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_weights(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    data_rng=data_gen.get_state(), torch_rng=torch.get_rng_state(),
                    best_loss=best["loss"], best_step=best["step"], since_best=best["since"]),
               tmp / STATE_FILE)
    swap_into_place(tmp, final)
    for old in step_dirs(out_dir)[:-keep_last]:
        shutil.rmtree(old)


def restore(directory: Path, model: GPT, optimizer, scheduler, data_gen: torch.Generator) -> tuple[int, dict]:
    from model.lora import has_lora, load_adapter_weights

    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if has_lora(model):
        load_adapter_weights(model, directory)
    else:
        model.load_state_dict(load_checkpoint(directory).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data_gen.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], dict(loss=state["best_loss"], step=state["best_step"], since=state["since_best"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    dirs = [d for d in step_dirs(out_dir) if (d / STATE_FILE).is_file()]
    return dirs[-1] if dirs else None


def checkpoint_step(directory: Path) -> int:
    return int(directory.name.removeprefix("step-"))


def step_dirs(out_dir: Path) -> list[Path]:
    return sorted(d for d in out_dir.glob("step-*") if d.is_dir())  # zero-padded: sorted by step


def swap_into_place(tmp: Path, final: Path) -> None:
    if final.exists():  # a replay after a resume, or a new best
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


# -- small files -------------------------------------------------------------------------

def read_run(out_dir: Path) -> dict | None:
    path = out_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
        raise OutputDirError(f"{path}: not a training run of ours (no \"format\": {RUN_FORMAT!r})")
    return run


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The run's per-step records (``metrics.jsonl``), for the store and the loss curve."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



def write_metrics(out_dir: Path, records: list[dict]) -> None:
    (out_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
