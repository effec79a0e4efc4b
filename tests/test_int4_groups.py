"""int4 on real widths: a group per matrix (the largest of 128, 64, 32 that divides its input
width, else 32 over zero-padded columns) in every int4 backend, recorded in ``info()``; an
explicit group stays strict; quantised checkpoints store each matrix's group and still read the
files written before (one ``group_size`` for all)."""

from __future__ import annotations

import json

import pytest
import torch

from backends import registry
from backends.base import GroupSizeError, int4_group, int4_group_counts
from backends.eager import EagerBackend
from backends.int8 import quantized_state
from backends.parity import check_parity
from bench.models import open_model
from bench.quantize import quantize_checkpoint
from model.checkpoint import CONFIG_FILE, save_checkpoint
from model.errors import InputError
from model.gpt import build_model, get_config
from model.qcheckpoint import QuantizedCheckpointError, load_quantized

# SmolLM2-135M's widths (576 wide, MLP 1536) on one small block: c_attn, attn.c_proj, mlp.c_fc and
# the LM head read 576 inputs (group 64), mlp.c_proj 1536 (group 128).
SMOL_WIDTHS = dict(n_layer=1, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, vocab_size=512,
                   block_size=64)
SMOL_GROUPS = {"128": 1, "64": 4}


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("width,expected", [
    (576, (64, 576)), (1536, (128, 1536)), (352, (32, 352)), (96, (32, 96)), (4864, (128, 4864)),
    (960, (64, 960)), (100, (32, 128)), (48, (32, 64)),
])
def test_the_group_is_the_largest_that_divides_else_32_over_padded_columns(width, expected):
    assert int4_group(width) == expected


def test_an_explicit_group_is_strict_and_one_line():
    assert int4_group(576, 64) == (64, 576)
    with pytest.raises(GroupSizeError) as e:
        int4_group(576, 128, backend="int8", matrix="transformer.h.0.attn.c_attn")
    assert isinstance(e.value, InputError) and len(str(e.value).splitlines()) == 1
    assert "group_size=128 does not divide in_features=576 of transformer.h.0.attn.c_attn" in str(e.value)
    assert int4_group_counts({"a": (128, 512, 512), "b": (32, 100, 128), "c": (32, 352, 352)}) == {
        "128": 1, "32": 1, "32 padded": 1}


# -- the int8 backend's int4 (torch's kernel) ---------------------------------------------------

def test_int8_int4_picks_smollm2_groups_and_matches_eager():
    model = build_model(get_config("llama-tiny", **SMOL_WIDTHS), seed=0)
    with registry.create("int8", precision="int4") as backend, EagerBackend() as eager:
        backend.load(model)
        eager.load(model)
        info = backend.info()
        result = check_parity(backend, eager, _ids(), steps=4)
    assert info["group_sizes"] == SMOL_GROUPS and info["group_choice"] == "per_matrix"
    assert info["group_size"] is None and info["padded_matrices"] == {}
    assert result.passed, result


def test_int8_int4_pads_a_width_no_group_divides():
    """An MLP of 100 (no 32 divides it): 32-groups over 128 zero-padded columns, answers intact."""
    model = build_model(get_config("llama-tiny", intermediate_size=100), seed=0)
    with registry.create("int8", precision="int4") as backend, EagerBackend() as eager:
        backend.load(model)
        eager.load(model)
        info = backend.info()
        result = check_parity(backend, eager, _ids(), steps=4)
    assert info["group_sizes"] == {"128": 7, "32 padded": 2}
    assert info["padded_matrices"] == {f"transformer.h.{i}.mlp.c_proj": "100->128" for i in range(2)}
    assert result.passed and result.max_abs_logit_diff < 0.5, result


def test_int8_int4_explicit_group_refuses_a_width_it_does_not_divide():
    with pytest.raises(GroupSizeError, match=r"group_size=128 does not divide in_features=352 of "
                                             r"transformer.h.0.mlp.c_proj; leave group_size unset"):
        registry.create("int8", precision="int4", group_size=128).load(build_model(get_config("llama-tiny")))
    with pytest.raises(InputError, match="group_size=16 is not one torch's int4 kernel takes"):
        registry.create("int8", precision="int4", group_size=16)


# -- its quantised checkpoints -----------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-fp32")
    save_checkpoint(build_model(get_config("llama-tiny", intermediate_size=100), seed=0), directory)
    return directory


def test_a_file_stores_each_matrix_group_and_gives_identical_logits(tmp_path, llama_source):
    out = tmp_path / "q"
    done = quantize_checkpoint(llama_source, "int4", out)
    assert done["group_size"] == "per matrix: 128 (7), 32 padded (2)"
    assert done["group_sizes"] == {"128": 7, "32 padded": 2}
    qc = load_quantized(out)
    assert qc.meta["group_size"] is None and qc.meta["group_choice"] == "per_matrix"
    assert qc.meta["group_sizes"]["transformer.h.0.mlp.c_proj"] == 32
    assert qc.meta["group_sizes"]["transformer.h.0.attn.c_attn"] == 128
    assert tuple(qc.tensors["transformer.h.0.mlp.c_proj.qweight"].shape) == (128, 64)  # 128 padded columns
    assert tuple(qc.tensors["transformer.h.0.mlp.c_proj.scales"].shape) == (128, 4)
    ids = _ids()
    with registry.create("int8", precision="int4") as from_file, registry.create("int8", precision="int4") as fresh:
        from_file.load(open_model(out, "int8", "int4"))
        fresh.load(open_model(llama_source, "int8", "int4"))
        assert torch.equal(from_file.prefill(ids)[0], fresh.prefill(ids)[0])
        assert from_file.info()["group_sizes"] == fresh.info()["group_sizes"]
        assert from_file.info()["requantized"] is False
    with registry.create("int8", precision="int4", group_size=32) as asked:
        with pytest.raises(QuantizedCheckpointError, match=r"holds group_size='per matrix \(128, 32\)', but "
                                                           r"group_size=32 was asked for"):
            asked.load(open_model(out, "int8", "int4"))


def test_a_file_from_before_per_matrix_groups_still_loads(tmp_path, tiny_model):
    """A format-2 file with one "group_size" and no "group_sizes" (what the code wrote before)."""
    save_checkpoint(tiny_model, tmp_path / "fp32")
    out = tmp_path / "old"
    quantize_checkpoint(tmp_path / "fp32", "int4", out, group_size=32)
    doc = json.loads((out / CONFIG_FILE).read_text())
    del doc["quantization"]["group_sizes"], doc["quantization"]["group_choice"]
    (out / CONFIG_FILE).write_text(json.dumps(doc))
    with registry.create("int8", precision="int4") as old, registry.create("int8", precision="int4",
                                                                          group_size=32) as fresh:
        old.load(open_model(out, "int8", "int4"))
        fresh.load(tiny_model)
        ids = _ids()
        assert torch.equal(old.prefill(ids)[0], fresh.prefill(ids)[0])
        assert old.info()["group_sizes"] == {"32": 9} and old.info()["group_size"] == 32


def test_an_old_style_group_must_divide_the_mlp_width_too(tmp_path):
    """One group for all (an older file) is checked against intermediate_size as well as n_embd."""
    model = build_model(get_config("llama-tiny"), seed=0)
    tensors, meta = quantized_state(model, "int4", group_size=32, prepack=False)
    from model.qcheckpoint import save_quantized
    save_quantized(tmp_path / "q", model.config, tensors, meta)
    doc = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    del doc["quantization"]["group_sizes"]
    doc["quantization"]["group_size"] = 128
    (tmp_path / "q" / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(QuantizedCheckpointError, match="group_size=128 does not divide intermediate_size=352"):
        load_quantized(tmp_path / "q")
    doc["quantization"]["group_sizes"] = {"transformer.h.0.attn.c_attn": 32}
    (tmp_path / "q" / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(QuantizedCheckpointError, match="group_sizes must name the group of every layer"):
        load_quantized(tmp_path / "q")


# -- the graph runtimes --------------------------------------------------------------------------

def _graph_backend(name: str, **options):
    probe = registry.probe_isolated(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")
    return registry.create(name, precision="int4", **options)


def test_onnxruntime_int4_picks_a_block_per_matmul(fresh_cache):
    model = build_model(get_config("llama-tiny", **SMOL_WIDTHS), seed=0)
    with _graph_backend("onnxruntime") as backend, EagerBackend() as eager:
        backend.load(model)
        eager.load(model)
        info = backend.info()
        assert check_parity(backend, eager, _ids(), steps=4).passed
    assert info["block_sizes"] == SMOL_GROUPS and info["block_choice"] == "per_matmul"
    assert info["block_size"] is None
    padded = build_model(get_config("llama-tiny", intermediate_size=100), seed=0)
    with _graph_backend("onnxruntime") as backend:
        backend.load(padded)  # MatMulNBits pads K=100 with zero rows to 128 itself
        assert backend.info()["block_sizes"] == {"128": 7, "32 padded": 2}
    with pytest.raises(GroupSizeError, match="block_size=128 does not divide in_features=352 of MatMul"):
        _graph_backend("onnxruntime", block_size=128).load(build_model(get_config("llama-tiny")))


def test_openvino_int4_picks_a_group_per_matrix_and_reads_it_back(fresh_cache):
    model = build_model(get_config("llama-tiny", **SMOL_WIDTHS), seed=0)
    with _graph_backend("openvino") as backend, EagerBackend() as eager:
        backend.load(model)
        eager.load(model)
        info = backend.info()
        assert check_parity(backend, eager, _ids(), steps=4).passed
    # NNCF keeps the (tied) embedding and LM head in int8 unless all_layers
    assert info["group_sizes"] == {"128": 1, "64": 3, "int8": 1} and info["group_choice"].startswith("per_matrix")
    with _graph_backend("openvino", all_layers=True) as backend:
        backend.load(model)
        assert backend.info()["group_sizes"] == SMOL_GROUPS
    padded = build_model(get_config("llama-tiny", intermediate_size=100), seed=0)
    with _graph_backend("openvino") as backend:
        backend.load(padded)  # NNCF cannot pad: a width no group divides goes to its backup int8
        assert backend.info()["group_sizes"] == {"128": 6, "int8": 3}
    with pytest.raises(GroupSizeError, match="group_size=128 does not divide in_features=352 of mlp.c_proj"):
        _graph_backend("openvino", group_size=128).load(build_model(get_config("llama-tiny")))
