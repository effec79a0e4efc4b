"""Quantised checkpoints of the graph runtimes (ONNX Runtime, OpenVINO): the runtime's own quantised
model in our format, loaded straight into a session with logits equal to the in-place one's, and
every way such a file can be wrong refused with one error naming the file or field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from backends import registry
from bench.cli import main
from bench.models import open_model
from bench.quantize import QuantizeInputError, quantize_checkpoint
from model.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from model.errors import InputError
from model.qcheckpoint import QFORMAT_VERSION, QuantizedCheckpointError, load_quantized

# (backend, precision, options, the file that holds the model)
CASES = [
    ("onnxruntime", "int8", {"int8_scheme": "per_channel"}, "model.onnx"),
    ("onnxruntime", "int4", {"block_size": 32}, "model.onnx"),
    ("openvino", "int8", {}, "model.bin"),
    ("openvino", "int4", {"group_size": 32}, "model.bin"),
]


def _available(name):
    probe = registry.probe_isolated(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model):
    directory = tmp_path_factory.mktemp("fp32")
    save_checkpoint(tiny_model, directory)
    return directory


@pytest.fixture(scope="module")
def written(tmp_path_factory, source):
    """Each case quantised into a file once: (backend, precision) -> directory."""
    cache = {}

    def get(backend, precision, options):
        key = (backend, precision)
        if key not in cache:
            _available(backend)
            cache[key] = tmp_path_factory.mktemp("q") / f"{backend}-{precision}"
            quantize_checkpoint(source, precision, cache[key], backend=backend, options=options)
        return cache[key]
    return get


def _ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("backend,precision,options,model_file", CASES)
def test_round_trip_loads_without_quantising_and_gives_identical_logits(
        backend, precision, options, model_file, source, written):
    out = written(backend, precision, options)
    meta = json.loads((out / CONFIG_FILE).read_text())["quantization"]
    assert meta["payload"] == "files" and model_file in meta["files"] and len(meta["files"][model_file]) == 64
    assert all(meta["options"][k] == v for k, v in options.items())
    assert meta["source"]["digest"] and meta["libraries"][backend]
    assert (out / "tokenizer.json").exists() == (source / "tokenizer.json").exists()
    with registry.create(backend, precision=precision, **options) as fresh, \
            registry.create(backend, precision=precision) as from_file:  # options come from the file
        fresh.load(load_checkpoint(source))
        from_file.load(open_model(out, backend, precision))
        assert torch.equal(fresh.logits(_ids()), from_file.logits(_ids()))
        info = from_file.info()
        assert info["requantized"] is False and info["quantized_checkpoint"] == str(out)
        assert info["model_path"].startswith(str(out))  # the file, not the export cache
        assert all(info.get(k, getattr(from_file, k)) == v for k, v in options.items())


def _copy(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


def _edit_meta(directory, edit):
    doc = json.loads((directory / CONFIG_FILE).read_text())
    edit(doc)
    (directory / CONFIG_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("backend,precision,options,model_file", CASES)
def test_a_missing_or_corrupted_model_file_is_one_clear_error(backend, precision, options, model_file, written,
                                                               tmp_path):
    bad = _copy(written(backend, precision, options), tmp_path)
    data = bytearray((bad / model_file).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (bad / model_file).write_bytes(bytes(data))
    with pytest.raises(QuantizedCheckpointError, match=f"{model_file}: does not match its sha256"):
        load_quantized(bad)
    (bad / model_file).unlink()
    with pytest.raises(QuantizedCheckpointError, match=f"{model_file}: missing"):
        load_quantized(bad)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.__setitem__("format_version", QFORMAT_VERSION + 1),
     f"format_version={QFORMAT_VERSION + 1} is newer than this code reads ({QFORMAT_VERSION})"),
    (lambda d: d["quantization"].__setitem__("scheme", "nf4"), "quantization.scheme='nf4' is not one of"),
    (lambda d: d["quantization"].__setitem__("files", {}), "quantization.files is empty"),
    (lambda d: d["quantization"].__setitem__("options", None), "quantization.options=None must be a dict"),
    (lambda d: d["quantization"]["files"].__setitem__("model.onnx", "abc"), "quantization.files['model.onnx']"),
])
def test_a_bad_config_is_one_clear_error_naming_the_field(edit, message, written, tmp_path):
    bad = _copy(written("onnxruntime", "int4", {"block_size": 32}), tmp_path)
    _edit_meta(bad, edit)
    with pytest.raises(QuantizedCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")) as e:
        load_quantized(bad)
    assert isinstance(e.value, InputError)


def test_a_file_from_a_newer_runtime_major_is_refused(written, tmp_path):
    bad = _copy(written("openvino", "int4", {"group_size": 32}), tmp_path)
    _edit_meta(bad, lambda d: d["quantization"]["libraries"].__setitem__("openvino", "9999.0.0"))
    with registry.create("openvino", precision="int4") as backend:
        with pytest.raises(QuantizedCheckpointError, match="libraries.openvino='9999.0.0' is a newer major"):
            backend.load(open_model(bad, "openvino", "int4"))


@pytest.mark.parametrize("backend,precision,options,model_file", CASES[1:2] + CASES[3:4])
def test_another_backend_precision_or_option_is_refused_never_requantised(backend, precision, options,
                                                                          model_file, written):
    out = written(backend, precision, options)
    use = f"use --backend {backend} --precision {precision}"
    for other, other_precision in (("eager", None), ("int8", "int4"), (backend, "int8"), (backend, None)):
        with pytest.raises(QuantizedCheckpointError, match=use):
            open_model(out, other, other_precision)
    with pytest.raises(QuantizedCheckpointError, match="only backend"):
        load_checkpoint(out)
    key = next(iter(options))
    with registry.create(backend, precision=precision, **{key: 64}) as runner:
        with pytest.raises(QuantizedCheckpointError, match=f"holds {key}=32, but {key}=64 was asked for"):
            runner.load(open_model(out, backend, precision))


def test_quantize_refuses_an_option_the_quantiser_does_not_take(source, tmp_path):
    _available("onnxruntime")
    with pytest.raises(QuantizeInputError, match="--option graph_optimization_level: not a quantiser option"):
        quantize_checkpoint(source, "int4", tmp_path / "a", backend="onnxruntime",
                            options={"graph_optimization_level": "basic"})
    with pytest.raises(QuantizeInputError, match="unknown onnxruntime options: group_size"):
        quantize_checkpoint(source, "int4", tmp_path / "b", backend="onnxruntime", group_size=32)


def test_cli_quantize_then_generate_and_run_from_the_onnx_file(source, tmp_path, capsys):
    _available("onnxruntime")
    out = tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(source), "--backend", "onnxruntime", "--precision", "int4",
                 "--option", "block_size=32", "--out", str(out)]) == 0
    assert "onnxruntime/int4 groupwise_asym, group size 32" in capsys.readouterr().out
    argv = ["generate", "--backend", "onnxruntime", "--precision", "int4", "--prompt-ids", "1,2,3",
            "--max-new-tokens", "5", "--json"]
    assert main([*argv, "--checkpoint", str(out)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main([*argv, "--checkpoint", str(source)]) == 0  # the default block size 128, not 32
    assert main(["generate", "--backend", "openvino", "--precision", "int4", "--checkpoint", str(out),
                 "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "for backend 'onnxruntime' at precision 'int4'" in err[0]
    assert len(from_file["token_ids"]) >= 5


def test_run_from_an_openvino_file_loads_it_as_it_is_and_checks_parity_on_the_source(source, written, tmp_path):
    import subprocess
    import sys

    out = written("openvino", "int4", {"group_size": 32})
    done = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--checkpoint", str(out), "--backend", "openvino,eager",
         "--precision", "int4", "--threads", "1", "--prompt-len", "8", "--gen-len", "4", "--budget", "0.5",
         "--launches", "1", "--store", str(tmp_path / "s.sqlite"), "--json"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cells = {c["backend"]: c for c in json.loads(done.stdout)}
    ov = cells["openvino"]
    assert ov["status"] == "ok" and ov["parity"]["passed"], ov.get("reason")
    assert ov["backend_info"]["requantized"] is False and ov["backend_info"]["group_size"] == 32
    assert ov["backend_info"]["model_path"] == str(out / "model.xml")  # compiled from the file itself
    assert cells["eager"]["status"] == "skipped"
