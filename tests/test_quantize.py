"""int4 and per-channel int8, and quantised checkpoints: a round trip that changes nothing, and
every way a file can be wrong (a missing, corrupted or misshapen tensor, a newer format, the
wrong backend) refused with one error naming the tensor or field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from backends import registry
from backends.int8 import quantized_state
from bench.cli import main
from bench.models import open_model, reference_model
from bench.quantize import QuantizeInputError, quantize_checkpoint
from model.checkpoint import CONFIG_FILE, SAFETENSORS_FILE, load_checkpoint, read_config, save_checkpoint
from model.errors import InputError
from model.qcheckpoint import QFORMAT_VERSION, QuantizedCheckpointError, load_quantized, tensor_digest

SCHEMES = [("int8", "per_tensor"), ("int8", "per_channel"), ("int4", None)]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_model):
    directory = tmp_path_factory.mktemp("fp32")
    save_checkpoint(tiny_model, directory)
    return directory


def _quantize(source, out, precision, scheme=None, group_size=None):
    return quantize_checkpoint(source, precision, out, int8_scheme=scheme, group_size=group_size)


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, source):
    out = tmp_path_factory.mktemp("q") / "int4"
    _quantize(source, out, "int4", group_size=32)
    return out


def _ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("precision,scheme", SCHEMES)
def test_round_trip_is_bit_identical_and_gives_identical_logits(tmp_path, source, precision, scheme):
    out = tmp_path / "q"
    _quantize(source, out, precision, scheme)
    fresh_tensors, meta = quantized_state(load_checkpoint(source), precision, scheme or "per_tensor", prepack=True)
    loaded = load_quantized(out)
    assert set(loaded.tensors) == set(fresh_tensors)
    for name, t in fresh_tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t), name
    assert loaded.meta["scheme"] == meta["scheme"]
    assert loaded.meta["source"]["digest"] and loaded.meta["libraries"]["torch"] == torch.__version__

    options = {} if scheme is None else {"int8_scheme": scheme}
    with registry.create("int8", precision=precision, **options) as fresh, \
            registry.create("int8", precision=precision) as from_file:
        fresh.load(load_checkpoint(source))
        from_file.load(open_model(out, "int8", precision))
        assert torch.equal(fresh.logits(_ids()), from_file.logits(_ids()))
        assert from_file.info()["requantized"] is False and fresh.info()["requantized"] is True
        assert from_file.weight_bytes() == fresh.weight_bytes()
        if precision == "int4":
            assert from_file.info()["prepacked"] == "from the file"


def test_int8_modules_built_from_the_tensor_set_equal_torchs_own_quantize_dynamic(source):
    """build_quantized makes its quantised Linears 1x1 and sizes them after (no placeholder prepack):
    the result must compute exactly what quantize_dynamic's modules compute."""
    from backends.int8 import build_quantized, quantize_linears, quantized_engine

    model = load_checkpoint(source)
    for per_channel in (False, True):
        reference = quantize_linears(model, quantized_engine(), per_channel=per_channel)
        tensors, meta = quantized_state(model, "int8", "per_channel" if per_channel else "per_tensor")
        built = build_quantized(model.config, tensors, meta)
        x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
        for name in meta["layers"][:3]:
            ref, mine = reference.get_submodule(name), built.get_submodule(name)
            assert (mine.in_features, mine.out_features) == (ref.in_features, ref.out_features)
            assert torch.equal(mine(x if mine.in_features == 128 else x.repeat(1, 1, 4)),
                               ref(x if ref.in_features == 128 else x.repeat(1, 1, 4)))


def test_a_stored_int4_pack_for_another_torch_or_cpu_is_packed_again_from_the_codes(tmp_path, int4_dir):
    other = _copy(int4_dir, tmp_path)
    doc = json.loads((other / CONFIG_FILE).read_text())
    doc["quantization"]["prepacked"]["cpu_capability"] = "NO AVX"  # as if written on another CPU
    (other / CONFIG_FILE).write_text(json.dumps(doc))
    with registry.create("int8", precision="int4") as stored, registry.create("int8", precision="int4") as again:
        stored.load(open_model(int4_dir, "int8", "int4"))
        again.load(open_model(other, "int8", "int4"))
        assert again.info()["prepacked"].startswith("packed again: the file's pack is for")
        assert torch.equal(stored.logits(_ids()), again.logits(_ids()))


def test_int4_records_its_parameters_and_holds_fewer_bytes(source):
    bytes_ = {}
    for precision, options in (("int8", {}), ("int4", {"group_size": 32})):
        with registry.create("int8", precision=precision, **options) as backend:
            backend.load(load_checkpoint(source))
            bytes_[precision] = backend.weight_bytes()
            info = backend.info()
    assert info["group_size"] == 32 and info["scheme"] == "groupwise_asym"
    assert info["kernel"] == "aten._weight_int4pack_mm_for_cpu"
    with registry.create("eager") as eager:
        eager.load(load_checkpoint(source))
        fp32 = eager.weight_bytes()
    assert bytes_["int4"] < bytes_["int8"] < fp32


def test_per_channel_int8_has_one_scale_per_output_row(source):
    tensors, meta = quantized_state(load_checkpoint(source), "int8", "per_channel")
    assert meta["scheme"] == "per_channel"
    assert tensors["transformer.h.0.mlp.c_fc.scales"].shape == (4 * 128,)
    assert tensors["lm_head.scales"].shape == (512,)
    assert len(set(tensors["lm_head.scales"].tolist())) > 1


def _rewrite(directory, edit_tensors=None, edit_meta=None, update_digests=False):
    """Change the file's tensors and/or config.json as a corruption or a newer writer would."""
    tensors = load_file(str(directory / SAFETENSORS_FILE))
    doc = json.loads((directory / CONFIG_FILE).read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if update_digests:
        doc["quantization"]["tensors"] = {k: tensor_digest(v) for k, v in tensors.items()}
    if edit_meta:
        edit_meta(doc)
    save_file(tensors, str(directory / SAFETENSORS_FILE), metadata={"format": doc["format"]})
    (directory / CONFIG_FILE).write_text(json.dumps(doc))


def _copy(int4_dir, tmp_path):
    import shutil
    return shutil.copytree(int4_dir, tmp_path / "copy")


SCALE = "transformer.h.1.attn.c_proj.scales"


def _corrupt_scale(t):
    t[SCALE] = t[SCALE].clone()
    t[SCALE].view(torch.int32)[0, 0] ^= 0x00400000  # one flipped bit in the first scale


@pytest.mark.parametrize("edit, digests, meta, message", [
    (lambda t: t.pop(SCALE), False, None, f"missing tensor {SCALE!r}"),
    (_corrupt_scale, False, None, f"tensor {SCALE!r} does not match its digest"),
    (lambda t: t.__setitem__(SCALE, t[SCALE][:, :2].contiguous()), True, None,
     f"tensor {SCALE!r} has shape (128, 2), expected (128, 4)"),
    (lambda t: t.__setitem__(SCALE, -t[SCALE]), True, None, f"tensor {SCALE!r} holds non-finite or non-positive"),
    (None, False, lambda d: d.__setitem__("format_version", QFORMAT_VERSION + 1),
     f"format_version={QFORMAT_VERSION + 1} is newer than this code reads ({QFORMAT_VERSION})"),
    (None, False, lambda d: d["quantization"].__setitem__("scheme", "nf4"), "quantization.scheme='nf4'"),
])
def test_a_bad_file_is_one_clear_error(tmp_path, int4_dir, edit, digests, meta, message):
    bad = _copy(int4_dir, tmp_path)
    _rewrite(bad, edit, meta, update_digests=digests)
    with pytest.raises(QuantizedCheckpointError) as e:
        load_quantized(bad)
    assert message in str(e.value)
    assert isinstance(e.value, InputError)


def test_wrong_backend_or_precision_is_refused_never_dequantised(int4_dir):
    for backend, precision in (("eager", None), ("onnxruntime", "int4"), ("int8", "int8"), ("int8", None)):
        with pytest.raises(QuantizedCheckpointError, match="use --backend int8 --precision int4"):
            open_model(int4_dir, backend, precision)
    with pytest.raises(QuantizedCheckpointError, match="only backend 'int8' at precision 'int4' loads it"):
        load_checkpoint(int4_dir)
    with registry.create("int8", precision="int4", group_size=64) as backend:
        with pytest.raises(QuantizedCheckpointError, match="holds group_size=32, but group_size=64 was asked"):
            backend.load(open_model(int4_dir, "int8", "int4"))
    assert read_config(int4_dir).n_embd == 128  # the config itself reads, for planning and memory
    assert reference_model(int4_dir).config.n_layer == 2  # the fp32 source, for parity


def test_quantize_refuses_bad_requests(tmp_path, source, int4_dir):
    with pytest.raises(QuantizeInputError, match="written for int8, onnxruntime, openvino only"):
        quantize_checkpoint(source, "int4", tmp_path / "a", backend="eager")
    with pytest.raises(QuantizeInputError, match="already quantised"):
        quantize_checkpoint(int4_dir, "int4", tmp_path / "b")
    with pytest.raises(QuantizeInputError, match="exists and is not empty"):
        quantize_checkpoint(source, "int4", int4_dir)


def test_cli_quantize_then_generate_from_the_file(tmp_path, source, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--checkpoint", str(source), "--precision", "int4", "--group-size", "32",
                 "--out", str(out)]) == 0
    assert "groupwise_asym, group size 32" in capsys.readouterr().out
    argv = ["generate", "--backend", "int8", "--precision", "int4", "--prompt-ids", "1,2,3",
            "--max-new-tokens", "5", "--json"]
    assert main([*argv, "--checkpoint", str(out)]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main([*argv[:-1], "--checkpoint", str(source), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == from_file["token_ids"]
    assert main(["generate", "--backend", "eager", "--checkpoint", str(out), "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantised checkpoint for backend 'int8' at precision 'int4'" in err
    assert main(["run", "--checkpoint", str(out), "--backend", "eager"]) == 2
    assert "never dequantised" in capsys.readouterr().err


@pytest.mark.parametrize("name,fields", [
    ("onnxruntime", ("block_size", "accuracy_level", "symmetric")),
    ("openvino", ("group_size", "ratio", "int4_mode")),
])
def test_graph_runtimes_int4_record_parameters_and_compress(name, fields, tiny_model):
    probe = registry.probe_isolated(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")
    sizes = {}
    for precision in ("int8", "int4"):
        with registry.create(name, precision=precision) as backend:
            backend.load(tiny_model)  # available, so a refusal is a failure: no CPU feature gates int8 or int4
            sizes[precision] = backend.weight_bytes()
            info = backend.info()
    assert all(f in info for f in fields)
    assert sizes["int4"] < sizes["int8"]
