"""The graph backends (onnxruntime, openvino): export and its cache, parity with eager, int8 and int4 graphs."""

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from backends import export, registry
from backends.base import BackendUnavailable, UnsupportedPrecision
from model.gpt import build_model, get_config

GRAPH_BACKENDS = ("onnxruntime", "openvino")


def skip_unless_available(name: str):
    probe = registry.probe(name)
    if not probe.available:
        pytest.skip(f"{name} unavailable: {probe.reason}")
    return probe


def loaded(name: str, model, **kwargs):
    skip_unless_available(name)
    backend = registry.create(name, **kwargs)
    backend.load(model)
    return backend


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, get_config("tiny").vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- the export cache -------------------------------------------------------------------------

@pytest.mark.parametrize("name,precision", [("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                            ("openvino", "fp32"), ("openvino", "int8")])
def test_second_load_is_a_cache_hit(name, precision, tiny_model, fresh_cache):
    first = loaded(name, tiny_model, precision=precision)
    second = loaded(name, tiny_model, precision=precision)
    assert first.info()["cache_hit"] is False
    assert second.info()["cache_hit"] is True
    assert first.info()["model_path"] == second.info()["model_path"]
    assert second.info()["model_path"].startswith(str(fresh_cache))
    # Exactly one entry per kind: the hit reused it rather than writing another.
    entries = [p for p in fresh_cache.glob("*/*") if p.parent.name != "openvino-blobs"]
    assert len(entries) == (2 if precision == "int8" else 1), entries
    assert not [p for p in fresh_cache.glob("*/.*")], "a temporary build directory was left behind"


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_different_weights_get_a_different_cache_entry(name, tiny_model):
    other = build_model(get_config("tiny"), seed=1)
    a, b = loaded(name, tiny_model), loaded(name, other)
    assert a.info()["fp32_key"] != b.info()["fp32_key"]
    assert a.info()["model_path"] != b.info()["model_path"]


@pytest.mark.parametrize("name,precision", [("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                            ("openvino", "fp32"), ("openvino", "int8")])
def test_an_edit_to_the_model_source_builds_a_new_graph(name, precision, tiny_model, fresh_cache, monkeypatch,
                                                        tmp_path):
    """An edit to model/gpt.py used to be served the graph traced from the old source."""
    module = sys.modules[type(tiny_model).__module__]  # model.gpt
    first = loaded(name, tiny_model, precision=precision)
    edited = tmp_path / "gpt.py"
    edited.write_text(Path(module.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(module, "__file__", str(edited))
    second = loaded(name, tiny_model, precision=precision)
    assert second.info()["export_cache_hit"] is False and second.info()["cache_hit"] is False
    assert second.info()["fp32_key"] != first.info()["fp32_key"]
    assert second.info()["model_path"] != first.info()["model_path"]


@pytest.mark.parametrize("name,precision,export_hit", [("onnxruntime", "int8", True), ("openvino", "fp32", False),
                                                       ("openvino", "int8", False)])
def test_an_edit_to_the_converting_backend_builds_a_new_graph(name, precision, export_hit, tiny_model, fresh_cache,
                                                              monkeypatch, tmp_path):
    """The backend module that converts or quantises is part of the key too; ONNX Runtime's
    fp32 export is the exporter's alone, so it is still reused."""
    module = sys.modules[registry.get_backend_class(name).__module__]
    first = loaded(name, tiny_model, precision=precision)
    edited = tmp_path / Path(module.__file__).name
    edited.write_text(Path(module.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(module, "__file__", str(edited))
    second = loaded(name, tiny_model, precision=precision)
    assert second.info()["export_cache_hit"] is export_hit
    assert second.info()["cache_hit"] is False
    assert second.info()["model_path"] != first.info()["model_path"]


def test_failed_build_leaves_no_entry(fresh_cache):
    def build(tmp):
        (tmp / "half.onnx").write_bytes(b"partial")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        export.cached("onnx-fp32", "somekey", build)
    assert list((fresh_cache / "onnx-fp32").iterdir()) == []
    _, meta, hit = export.cached("onnx-fp32", "somekey", lambda tmp: {"built": True})
    assert hit is False and meta["built"] is True
    assert export.cached("onnx-fp32", "somekey", build)[2] is True  # build is not called again


def test_onnx_export_has_dynamic_axes_and_passes_the_checker(tiny_model, fresh_cache):
    onnx = pytest.importorskip("onnx")
    from backends.base import model_fingerprint
    path, meta, hit = export.onnx_fp32(tiny_model, model_fingerprint(tiny_model))
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    n_layer, cfg = tiny_model.config.n_layer, tiny_model.config

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    inputs, outputs = dims(graph.input), dims(graph.output)
    assert list(inputs) == export.input_names(n_layer)
    assert list(outputs) == export.output_names(n_layer)
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total"]
    assert inputs["past_key_0"] == ["batch", cfg.n_head, "past", cfg.head_dim]
    assert outputs["present_value_1"] == ["batch", cfg.n_head, "total", cfg.head_dim]
    assert outputs["logits"][0] == "batch" and outputs["logits"][2] == cfg.vocab_size
    assert meta["opset"] == export.OPSET
    assert any(op.domain in ("", "ai.onnx") and op.version == export.OPSET for op in onnx.load(str(path)).opset_import)


# -- answers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_prefill_and_decode_match_eager(name, tiny_model, eager):
    backend = loaded(name, tiny_model, threads=1)
    ids = prompts(2, 5)
    ref_logits, ref_cache = eager.prefill(ids)
    logits, cache = backend.prefill(ids)
    assert logits.shape == (2, tiny_model.config.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    for _ in range(4):
        nxt = ref_logits.argmax(-1, keepdim=True)
        ref_logits, ref_cache = eager.decode(nxt, ref_cache)
        logits, cache = backend.decode(nxt, cache)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert backend.cache_length(cache) == eager.cache_length(ref_cache) == 9
    assert backend.cache_bytes(cache) == eager.cache_bytes(ref_cache)


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_left_padded_batch_matches_eager(name, tiny_model, eager):
    backend = loaded(name, tiny_model)
    ids = prompts(2, 6)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :3] = 0  # the second prompt is three tokens, left-padded
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_logits, ref_cache = eager.prefill(ids, pos, mask)
    logits, cache = backend.prefill(ids, pos, mask)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    for _ in range(3):
        nxt = ref_logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
        pos = pos[:, -1:] + 1
        ref_logits, ref_cache = eager.decode(nxt, ref_cache, pos, mask)
        logits, cache = backend.decode(nxt, cache, pos, mask)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_reorder_cache_matches_eager(name, tiny_model, eager):
    backend = loaded(name, tiny_model)
    ids = prompts(3, 4, seed=2)
    ref_logits, ref_cache = eager.prefill(ids)
    logits, cache = backend.prefill(ids)
    index = torch.tensor([2, 0, 2, 1])  # beams 2 and 0 survive; 2 twice; batch grows to 4
    ref_cache, cache = eager.reorder_cache(ref_cache, index), backend.reorder_cache(cache, index)
    nxt = ref_logits.argmax(-1, keepdim=True)[index]
    ref_logits, _ = eager.decode(nxt, ref_cache)
    logits, cache = backend.decode(nxt, cache)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[0], logits[2])  # the duplicated beam
    assert backend.cache_length(cache) == 5


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_mask_of_the_wrong_length_is_refused(name, tiny_model):
    backend = loaded(name, tiny_model)
    _, cache = backend.prefill(prompts(1, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        backend.decode(prompts(1, 1), cache, mask=torch.ones(1, 3, dtype=torch.int64))


# -- int8 -------------------------------------------------------------------------------------

def test_onnxruntime_int8_graph_is_quantized(tiny_model, parity, parity_copy):
    onnx = pytest.importorskip("onnx")
    backend = loaded("onnxruntime", tiny_model, precision="int8", graph="export")  # dynamic int8 (the decoder's: 8-bit MatMulNBits)
    ops = Counter(n.op_type for n in onnx.load(backend.info()["model_path"]).graph.node)
    n_layer = tiny_model.config.n_layer
    weight_matmuls = 4 * n_layer + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block, lm_head
    assert ops["MatMulInteger"] == weight_matmuls, ops
    assert ops["DynamicQuantizeLinear"] >= 1, ops
    assert ops["MatMul"] == 2 * n_layer, ops  # only q.k and p.v stay float: they have no weights
    fp32 = loaded("onnxruntime", tiny_model)
    assert backend.weight_bytes() < 0.5 * fp32.weight_bytes()
    parity.check(loaded("onnxruntime", parity_copy, precision="int8", graph="export"))  # quantised but still the same model


def test_openvino_int8_ir_has_compressed_weights(tiny_model, parity, parity_copy):
    ov = pytest.importorskip("openvino")
    backend = loaded("openvino", tiny_model, precision="int8")
    model = ov.Core().read_model(backend.info()["model_path"])
    types = Counter(op.get_output_element_type(0).get_type_name()
                    for op in model.get_ops() if op.get_type_name() == "Constant")
    n_layer = tiny_model.config.n_layer
    assert types["u8"] + types["i8"] >= 4 * n_layer + 1, types  # every weight matrix, LM head included
    fp32 = loaded("openvino", tiny_model)
    assert backend.weight_bytes() < 0.5 * fp32.weight_bytes()
    info = backend.info()
    assert info["inference_precision"] == "f32" and info["dynamic_quantization_group_size"] == 0
    parity.check(loaded("openvino", parity_copy, precision="int8"))


def test_openvino_int8_sym_mode_gives_signed_weights(tiny_model):
    ov = pytest.importorskip("openvino")
    backend = loaded("openvino", tiny_model, precision="int8", int8_mode="sym")
    model = ov.Core().read_model(backend.info()["model_path"])
    types = Counter(op.get_output_element_type(0).get_type_name()
                    for op in model.get_ops() if op.get_type_name() == "Constant")
    assert types["i8"] >= 4 * tiny_model.config.n_layer + 1, types


# -- int4 -------------------------------------------------------------------------------------

def _lm_head_weight_type(ov_model) -> str:
    """The element type of the constant the logits' MatMul reads its weight from (through the
    decompression Convert/Subtract/Multiply/Reshape chain NNCF puts between them)."""
    vocab, n_embd = get_config("tiny").vocab_size, get_config("tiny").n_embd
    node = ov_model.output("logits").get_node().input_value(0).get_node()
    while node.get_type_name() != "MatMul":
        node = node.input_value(0).get_node()
    todo = [node.input_value(1).get_node()]
    while todo:
        n = todo.pop()
        if n.get_type_name() == "Constant" and math.prod(n.get_output_shape(0)) == vocab * n_embd:  # not a scale
            return n.get_output_element_type(0).get_type_name()
        todo += [v.get_node() for v in n.input_values()]
    raise AssertionError("no vocab-sized constant feeds the LM head")


@pytest.mark.parametrize("all_layers,head_type", [(False, "u8"), (True, "u4")])
def test_openvino_int4_lm_head_precision_follows_all_layers(all_layers, head_type, parity, parity_copy):
    ov = pytest.importorskip("openvino")
    backend = loaded("openvino", parity_copy, precision="int4", all_layers=all_layers)
    assert _lm_head_weight_type(ov.Core().read_model(backend.info()["model_path"])) == head_type
    assert backend.info()["all_layers"] is all_layers
    parity.check(backend)


def test_openvino_int4_quantises_activations_by_default(tiny_model):
    info = loaded("openvino", tiny_model, precision="int4").info()
    assert info["dynamic_quantization_group_size"] == 32  # read back from the compiled model
    assert info["activations"] == "int8, quantised per call in groups of 32"
    asked = loaded("openvino", tiny_model, precision="int4", dynamic_quantization_group_size=64).info()
    assert asked["dynamic_quantization_group_size"] == 64
    f32 = loaded("openvino", tiny_model, precision="int4", dynamic_quantization_group_size=0).info()
    assert f32["dynamic_quantization_group_size"] == 0 and f32["activations"] == "f32"
    assert loaded("openvino", tiny_model, precision="int8").info()["dynamic_quantization_group_size"] == 0
    # The setting goes to the CPU plugin only; another device's record does not claim it.
    from backends import registry
    assert registry.get_backend_class("openvino")(precision="int4", device="gpu").info()["activations"] \
        == "the GPU plugin's default"


# -- runtime settings -------------------------------------------------------------------------

def test_onnxruntime_session_options_are_applied(tiny_model):
    backend = loaded("onnxruntime", tiny_model, threads=1, graph_optimization_level="basic")
    info = backend.info()
    assert info["intra_op_num_threads"] == 1
    assert info["inter_op_num_threads"] == 1
    assert info["graph_optimization_level"].endswith("ORT_ENABLE_BASIC")
    assert info["execution_mode"].endswith("ORT_SEQUENTIAL")
    assert info["providers"] == ["CPUExecutionProvider"]
    assert loaded("onnxruntime", tiny_model, threads=2).info()["intra_op_num_threads"] == 2


def test_openvino_compiled_properties_are_read_back(tiny_model):
    backend = loaded("openvino", tiny_model, threads=1)
    info = backend.info()
    assert info["inference_num_threads"] == 1
    assert info["performance_hint"] == "LATENCY"
    assert info["inference_precision"] == "f32"
    assert info["execution_devices"] == ["CPU"]
    assert loaded("openvino", tiny_model, threads=2).info()["inference_num_threads"] == 2


def _cpu_has_native_bf16() -> bool:
    from backends.base import isa_has_native_bf16
    from bench.machine.environment import fingerprint
    return isa_has_native_bf16(fingerprint()["cpu"]["isa"])


def test_openvino_bf16_is_refused_without_native_bf16(parity, parity_copy, fresh_cache):
    """The CPU's own flags decide which branch runs, not OpenVINO's report: a CPU with AVX-512
    BF16 or AMX whose bf16 request is refused fails here. (A fresh cache: see the next test.)"""
    probe = skip_unless_available("openvino")
    backend = registry.create("openvino", precision="bf16")
    native = _cpu_has_native_bf16()
    assert ("BF16" in probe.versions["cpu_capabilities"].split(",")) is native, probe.versions["cpu_capabilities"]
    if native:
        backend.load(parity_copy)  # it must really compile bf16, and answer as eager does
        assert backend.info()["inference_precision"] == "bf16"
        parity.check(backend)
    else:
        with pytest.raises(UnsupportedPrecision, match="asked for bf16 but compiled f32"):
            backend.load(parity_copy)


def test_an_fp32_blob_does_not_poison_a_bf16_compile(parity, parity_model, fresh_cache):
    """openvino 2026.4's CPU plugin keys its compiled-blob cache without the inference precision:
    a bf16 compile after an fp32 one of the same IR imported the fp32 blob and answered wrongly (on
    parity_model: max |logit diff| 12.6, top-1 45.8%; NaN on a second import). The backend keeps a
    blob directory per compile configuration (backends.openvino.blob_cache)."""
    import copy
    skip_unless_available("openvino")
    if not _cpu_has_native_bf16():
        pytest.skip("this CPU has neither AVX-512 BF16 nor AMX-BF16: openvino refuses bf16 here")
    loaded("openvino", copy.deepcopy(parity_model))  # fp32 first, into the same cache
    parity.check(loaded("openvino", copy.deepcopy(parity_model), precision="bf16"))


def test_onnxruntime_refuses_bf16_and_unknown_options():
    with pytest.raises(UnsupportedPrecision, match="bf16"):
        registry.create("onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="graph_optimization_level='fast'"):
        registry.create("onnxruntime", graph_optimization_level="fast")
    with pytest.raises(ValueError, match="unknown onnxruntime options: intra_threads"):
        registry.create("onnxruntime", intra_threads=3)


def test_missing_devices_are_unavailable_not_substituted(tiny_model):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
            registry.create("onnxruntime", device="cuda").load(tiny_model)
    ov = pytest.importorskip("openvino")
    if "NPU" not in ov.Core().available_devices:
        with pytest.raises(BackendUnavailable, match="no device 'NPU'"):
            registry.create("openvino", device="npu").load(tiny_model)


@pytest.mark.parametrize("name", GRAPH_BACKENDS)
def test_probe_reports_versions_and_devices(name):
    probe = skip_unless_available(name)
    assert "cpu" in probe.devices
    assert probe.versions[name]
    assert all(isinstance(v, str) for v in probe.versions.values())
