"""Data-parallel training (``bench train --workers N``): N gloo workers on this machine take one
worker's steps, a worker that dies stops the run in one line, and the run resumes with any count."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from model.distributed import WorkerFailed, launch_local
from model.gpt import GPT, get_config
from model.train import TrainConfig, train

TINY = get_config("tiny")
RUN = TrainConfig(steps=20, batch_size=4, context=16, warmup_steps=2, eval_every=10, eval_batches=2,
                  checkpoint_every=5, keep_last=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread for these tests


def streams():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, TINY.vocab_size, (29,), generator=g)
    return pattern.repeat(150), pattern.repeat(25)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one"
    summary = train(TINY, RUN, *streams(), out)
    return out, summary


def test_two_workers_take_one_workers_steps(one_worker, tmp_path):
    out1, one = one_worker
    two = train(TINY, RUN, *streams(), tmp_path / "two", workers=2, launch=launch_local)
    assert two.status == "complete" and two.step == 20
    expected, got = losses(out1), losses(tmp_path / "two")
    assert len(got) == 20 and got[-1] < got[0]  # it trained
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert two.val_loss == pytest.approx(one.val_loss, rel=1e-5)
    from model.checkpoint import load_checkpoint
    a, b = load_checkpoint(out1).state_dict(), load_checkpoint(tmp_path / "two").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["workers"] == 2


def test_the_global_batch_must_divide_among_the_workers(tmp_path):
    from model.train import TrainConfigError
    with pytest.raises(TrainConfigError, match="batch_size=4 is the global batch"):
        train(TINY, RUN, *streams(), tmp_path / "three", workers=3, launch=launch_local)
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("extra, message", [
    (["--workers", "3"], "--batch-size 4 is the global batch and must divide evenly among --workers 3"),
    (["--workers", "2", "--on", "accelerator=cpu"], "--address and --on place Ray workers: give --executor ray"),
    (["--workers", "2", "--executor", "ray", "--on", "eager:accelerator=cpu"], "no backends to scope a label to"),
])
def test_bad_worker_options_are_one_line_and_exit_2(extra, message, tmp_path, capsys):
    from bench.cli import main

    rc = main(["train", "--model", "tiny", "--batch-size", "4", "--out", str(tmp_path / "out"),
               "--store", str(tmp_path / "bench.sqlite"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


class DiesAtStep:
    """A model maker (it pickles into the workers) whose worker ``rank`` kills itself with SIGKILL
    in the forward pass of step ``step``: a worker lost to the OOM killer or a failed node."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def __call__(self):
        import torch.distributed as dist

        model = GPT(TINY).init_weights(RUN.seed)
        if dist.is_initialized() and dist.get_rank() == self.rank:
            calls = [0]

            def hook(module, args):
                calls[0] += 1
                if calls[0] == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)
            model.register_forward_pre_hook(hook)
        return model


def test_a_killed_worker_stops_the_run_in_one_line_and_resume_loses_nothing(one_worker, tmp_path):
    out1, _ = one_worker
    out = tmp_path / "killed"
    with pytest.raises(WorkerFailed) as failed:
        train(TINY, RUN, *streams(), out, workers=2, launch=launch_local, init=DiesAtStep(rank=1, step=13))
    line = str(failed.value)
    assert len(line.splitlines()) == 1
    assert "worker 1 of 2" in line and "SIGKILL" in line and "step-000010" in line and "--resume" in line
    # Resumed with one worker (any count resumes): the last complete checkpoint, then on to the end,
    # the same losses as one worker that never stopped.
    summary = train(TINY, RUN, *streams(), out, resume=True)
    assert summary.status == "complete" and summary.step == 20
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(out1)), rtol=1e-5, atol=1e-5)


@pytest.mark.serial  # a Ray cluster and Ray Train's actors: heavy on two cores, so run alone
def test_the_ray_path_trains_on_a_local_cluster_with_one_workers_losses(one_worker, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch", reason="--executor ray needs ray[train]")
    from ray.cluster_utils import Cluster

    from bench.executors.ray_train import ray_launcher

    root = str(Path(__file__).resolve().parents[1])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, saved]))  # the workers run this checkout
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, labels={"accelerator": "cpu"}, include_dashboard=False, object_store_memory=80 * 2**20))
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        steps = []
        summary = train(TINY, RUN, *streams(), tmp_path / "ray", workers=2, on_step=lambda p: steps.append(p.step),
                        launch=ray_launcher(on=["accelerator=cpu"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert summary.status == "complete" and steps == list(range(1, 21))  # rank 0's progress came back
    out1, _ = one_worker
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "ray")), torch.tensor(losses(out1)),
                               rtol=1e-5, atol=1e-5)
