"""`bench run --backend all` for real: the real probes, the real plan, a real launch per runnable cell.

One sweep, shared by the module: the tiny preset at int8, batch 1, one launch of a 4-token
generation. int8 keeps the launches to the backends that quantise (int8, onnxruntime, openvino and
the peers optimum-openvino, llamacpp, ctranslate2 and openvino-genai); every other backend is
planned and stored as skipped, because it does not support int8, because its probe says it is
unavailable, or because its converter cannot take GPT-2 (onnxruntime-genai), with the reason.
Probing all fifteen backends in child processes is most of its time (about a minute on two cores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends import registry
from bench.store import Store
from model.gpt import get_config

ROOT = Path(__file__).resolve().parent.parent
# Probes cheap enough to repeat in this process (torch, onnxruntime, openvino): an independent look.
CHEAP_PROBES = ("eager", "mkl", "int8", "cuda", "compile", "onnxruntime", "openvino")


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("backend-all")
    store = tmp / "bench.sqlite"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--model", "tiny", "--backend", "all", "--precision", "int8",
           "--batch", "1", "--threads", "1", "--launches", "1", "--budget", "0.2", "--prompt-len", "4",
           "--gen-len", "4", "--no-parity", "--store", str(store), "--json"]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    # What the command said of each backend its probe found unavailable: "not run: NAME: REASON".
    not_run = dict(m.groups() for m in re.finditer(r"^not run: ([\w-]+): (.+)$", done.stderr, re.MULTILINE))
    run = Store(store).get_run("latest")
    return dict(stdout_cells=json.loads(done.stdout), run=run, not_run=not_run, stderr=done.stderr)


def cells_by_backend(swept) -> dict[str, dict]:
    cells = swept["run"]["cells"]
    by = {c["backend"]: c for c in cells}
    assert len(by) == len(cells), "one cell per backend at one precision, batch and thread count"
    return by


def test_every_registered_backend_is_planned_and_stored(swept):
    assert swept["run"]["sweep"]["backends"] == registry.names()  # peers and compile included
    assert set(cells_by_backend(swept)) == set(registry.names())
    assert {c["cell_id"] for c in swept["stdout_cells"]} == {c["cell_id"] for c in swept["run"]["cells"]}


def test_each_backend_ran_or_says_why_not(swept):
    for name, cell in cells_by_backend(swept).items():
        assert cell["status"] in ("ok", "skipped"), (name, cell["status"], cell.get("reason"))
        if cell["status"] == "ok":
            assert cell["decode_tok_s"] > 0 and cell["launches"] == 1, name
        else:
            assert cell["reason"], name


def test_a_backend_is_skipped_as_unavailable_exactly_when_its_probe_says_so(swept):
    """The command's real probes decide: a backend it reported as not run is stored skipped with that
    probe's reason; any other backend that supports int8 ran and is ok (a refusal or a failure on a
    machine whose probe says available is a failure of this test, not a skip); the rest say that they
    do not support int8."""
    for name, cell in cells_by_backend(swept).items():
        if name in swept["not_run"]:
            assert cell["status"] == "skipped", name
            assert cell["reason"].startswith("backend unavailable: ") and swept["not_run"][name] in cell["reason"]
        elif registry.get_backend_class(name).model_refusal(get_config("tiny")):  # a peer whose converter cannot take it
            assert cell["status"] == "skipped" and f"backend {name!r} cannot run tiny: " in cell["reason"], name
        elif "int8" in registry.get_backend_class(name).precisions:
            assert cell["status"] == "ok", (name, cell["status"], cell.get("reason"))
        else:
            assert cell["status"] == "skipped" and "unavailable" not in cell["reason"], (name, cell["reason"])
            assert f"backend {name!r} does not support precision 'int8'" in cell["reason"]


def test_the_probes_agree_with_probing_again_in_this_process(swept):
    """An independent look at the cheap probes: what is available here is never reported as not run,
    and what is not is (cuda on a machine without a GPU)."""
    for name in CHEAP_PROBES:
        probe = registry.probe(name)
        assert (name not in swept["not_run"]) == probe.available, (name, probe.reason, swept["not_run"].get(name))
    assert "eager" not in swept["not_run"]  # eager is available everywhere
