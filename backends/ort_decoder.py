"""The decoder graph: our model written straight into ONNX Runtime's fused decoder operators.

``backends.export`` traces ``GPT.forward`` into plain ONNX operators. On ONNX Runtime that graph
is correct but slow at decode: a profile of ``smollm2-135m`` (30 layers) at int4 and batch 1 on
a 2-vCPU Xeon spent 27% of its kernel time in the weight matmuls and the rest in some 700 small
nodes per step (Gather, Concat of the cache, Transpose, Unsqueeze, Slice, Reshape, Shape, the
rotary and mask arithmetic), plus about 12 ms per step of session overhead between them. This
module writes the same model as a handful of ORT's own decoder operators per layer instead,
from the weights, with no tracing:

    Gather (token embedding) [+ Gather (learned positions) + Add]
    per layer:  (Skip)LayerNormalization or (Skip)SimplifiedLayerNormalization (the residual
                Add fused in, and the previous projection's bias)
                MatMul q|k|v [+ Add bias]
                GroupQueryAttention (packed q|k|v, rotary applied inside from cos/sin tables,
                                     grouped heads, the KV cache updated in place)
                MatMul output projection
                SkipLayerNormalization / SkipSimplifiedLayerNormalization
                MatMul c_fc, then FastGelu (with c_fc's bias), or Split, Sigmoid, Mul, Mul (SwiGLU)
                MatMul c_proj
    SkipLayerNormalization (ln_f), Slice (last position), MatMul (LM head)

    inputs:  input_ids (B, T) int64, [position_ids (B, T) int64: learned positions only],
             attention_bias (B, 1, T, S) float32 (0 where a query may look, -1e9 where not),
             seqlens_k (B,) int32 (S - 1), total_sequence_length () int32 (S),
             past_key_i, past_value_i (B, n_kv_head, capacity, head_dim) float32
    outputs: logits (B, 1, vocab), present_key_i, present_value_i (the same buffers)

**The KV cache is one preallocated buffer per layer and kind, written in place.** The backend
binds ``present_key_i`` to the very ``OrtValue`` it binds as ``past_key_i``;
GroupQueryAttention sees the two share memory and writes the step's keys and values at
positions S - T .. S - 1, so no step copies the cache. A buffer that fills is doubled once
(one copy), so a long generation copies its cache O(log n) times, not once per step.

**Padding** (left-padded prompts of unequal length) is the attention bias: -1e9 on padded keys.
Rotary positions are then the buffer's index (GroupQueryAttention's own), not the caller's
position ids, which start after the padding: the same for an unpadded batch, and for a padded
row shifted by its padding, which rotary attention cannot see (q.k depends on the difference of
the two positions only). Learned positions (GPT-2) come from ``position_ids`` as before.

What it refuses, at load, in one line each: sinusoidal positions (no preset uses them for
decoding), a sliding window (Mistral: GroupQueryAttention's local window is not checked against
ours yet) and a head_dim that is not a multiple of 16 (GroupQueryAttention's CPU kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from backends.base import BackendError

OPSET = 17
MASKED = -1e9  # added to the scores of keys a query may not see (a finite number: no NaN rows)
MIN_CAPACITY = 64


def refusal(config) -> str | None:
    """Why the decoder graph cannot express ``config``, or None."""
    if config.pos_encoding not in ("learned", "rotary"):
        return f"the decoder graph takes learned or rotary positions, not {config.pos_encoding!r} (use graph=export)"
    if config.sliding_window is not None:
        return "the decoder graph does not take a sliding window yet (use graph=export)"
    if config.head_dim % 16:
        return (f"ONNX Runtime's GroupQueryAttention needs head_dim a multiple of 16, this model has "
                f"{config.head_dim} (use graph=export)")
    return None


def input_names(config) -> list[str]:
    names = ["input_ids"] + (["position_ids"] if config.pos_encoding == "learned" else [])
    names += ["attention_bias", "seqlens_k", "total_sequence_length"]
    for i in range(config.n_layer):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def build(model: torch.nn.Module):
    """The decoder graph of ``model`` (fp32 weights as initializers), an ``onnx.ModelProto``."""
    from onnx import TensorProto, helper, numpy_helper

    from model.gpt import rope_inv_freq

    config = model.config
    reason = refusal(config)
    if reason:
        raise BackendError(reason)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    H, KV, D = config.n_head, config.n_kv_head, config.head_dim
    layernorm = config.norm == "layernorm"
    eps = float(config.layer_norm_epsilon)
    nodes, inits = [], []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs, outputs, name: str, domain: str = "", **attrs):
        nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def matmul(x: str, key: str, name: str) -> str:
        """x @ weight.T: an initializer (in, out), which the int8/int4 quantisers find and replace."""
        return node("MatMul", [x, init(f"{key}.weight.T", sd[f"{key}.weight"].T)], [f"{name}/out"], name)

    def norm(x: str, key: str, name: str) -> str:
        if layernorm:
            return node("LayerNormalization", [x, init(f"{key}.weight", sd[f"{key}.weight"]),
                                               init(f"{key}.bias", sd[f"{key}.bias"])],
                        [f"{name}/out"], name, axis=-1, epsilon=eps)
        return node("SimplifiedLayerNormalization", [x, init(f"{key}.weight", sd[f"{key}.weight"])],
                    [f"{name}/out"], name, axis=-1, epsilon=eps)

    def skip_norm(x: str, residual: str, key: str, bias_key: str | None, name: str) -> tuple[str, str]:
        """(norm(x + bias + residual), x + bias + residual): the residual Add fused into the norm."""
        bias = init(bias_key, sd[bias_key]) if bias_key and bias_key in sd else ""
        if layernorm:
            inputs = [x, residual, init(f"{key}.weight", sd[f"{key}.weight"]), init(f"{key}.bias", sd[f"{key}.bias"]), bias]
            op, domain = "SkipLayerNormalization", "com.microsoft"
        else:
            inputs = [x, residual, init(f"{key}.weight", sd[f"{key}.weight"]), "", bias]
            op, domain = "SkipSimplifiedLayerNormalization", "com.microsoft"
        while inputs and inputs[-1] == "":
            inputs.pop()
        out, _, _, total = node(op, inputs, [f"{name}/out", "", "", f"{name}/sum"], name, domain, epsilon=eps)
        return out, total

    x = node("Gather", [init("wte", sd["transformer.wte.weight"]), "input_ids"], ["embed/out"], "embed")
    if config.pos_encoding == "learned":
        p = node("Gather", [init("wpe", sd["transformer.wpe.weight"]), "position_ids"], ["pos/out"], "pos")
        x = node("Add", [x, p], ["embed_pos/out"], "embed_pos")
    if config.pos_encoding == "rotary":
        angles = np.arange(config.block_size, dtype=np.float32)[:, None] * rope_inv_freq(config).numpy()[None, :]
        init("cos_cache", np.cos(angles).astype(np.float32))  # (context, head_dim / 2), as model.gpt computes them
        init("sin_cache", np.sin(angles).astype(np.float32))

    residual, pending, pending_bias = x, None, None
    for i in range(config.n_layer):
        pre = f"transformer.h.{i}"
        if pending is None:
            h = norm(residual, f"{pre}.ln_1", f"/h.{i}/ln_1")
        else:
            h, residual = skip_norm(pending, residual, f"{pre}.ln_1", pending_bias, f"/h.{i}/ln_1")
        qkv = matmul(h, f"{pre}.attn.c_attn", f"/h.{i}/attn/qkv")
        if f"{pre}.attn.c_attn.bias" in sd:
            qkv = node("Add", [qkv, init(f"{pre}.attn.c_attn.bias", sd[f"{pre}.attn.c_attn.bias"])],
                       [f"/h.{i}/attn/qkv_bias/out"], f"/h.{i}/attn/qkv_bias")
        rotary = config.pos_encoding == "rotary"
        attn = node("GroupQueryAttention",
                    [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                     "cos_cache" if rotary else "", "sin_cache" if rotary else "", "", "attention_bias"],
                    [f"/h.{i}/attn/gqa/out", f"present_key_{i}", f"present_value_{i}"], f"/h.{i}/attn/gqa",
                    "com.microsoft", num_heads=H, kv_num_heads=KV, scale=1.0 / math.sqrt(D),
                    do_rotary=int(rotary), rotary_interleaved=0, local_window_size=-1)[0]
        o = matmul(attn, f"{pre}.attn.c_proj", f"/h.{i}/attn/o")
        h, residual = skip_norm(o, residual, f"{pre}.ln_2", f"{pre}.attn.c_proj.bias", f"/h.{i}/ln_2")
        up = matmul(h, f"{pre}.mlp.c_fc", f"/h.{i}/mlp/fc")
        fc_bias = f"{pre}.mlp.c_fc.bias"
        if config.mlp == "swiglu":
            if fc_bias in sd:
                up = node("Add", [up, init(fc_bias, sd[fc_bias])], [f"/h.{i}/mlp/fc_bias/out"], f"/h.{i}/mlp/fc_bias")
            gate, lin = _split(node, up, i)
            sig = node("Sigmoid", [gate], [f"/h.{i}/mlp/sigmoid/out"], f"/h.{i}/mlp/sigmoid")
            silu = node("Mul", [gate, sig], [f"/h.{i}/mlp/silu/out"], f"/h.{i}/mlp/silu")
            act = node("Mul", [silu, lin], [f"/h.{i}/mlp/glu/out"], f"/h.{i}/mlp/glu")
        else:  # GPT-2's tanh GELU, with c_fc's bias added inside
            inputs = [up] + ([init(fc_bias, sd[fc_bias])] if fc_bias in sd else [])
            act = node("FastGelu", inputs, [f"/h.{i}/mlp/gelu/out"], f"/h.{i}/mlp/gelu", "com.microsoft")
        pending, pending_bias = matmul(act, f"{pre}.mlp.c_proj", f"/h.{i}/mlp/proj"), f"{pre}.mlp.c_proj.bias"

    h, _ = skip_norm(pending, residual, "transformer.ln_f", pending_bias, "/ln_f")
    last = node("Slice", [h, init("last/start", np.array([-1], np.int64)), init("last/end", np.array([2**62], np.int64)),
                          init("last/axis", np.array([1], np.int64))], ["last/out"], "last")
    node("MatMul", [last, init("lm_head.weight.T", sd["lm_head.weight"].T)], ["logits"], "lm_head")

    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cache_shape = ["batch", KV, "capacity", D]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"])]
    if config.pos_encoding == "learned":
        inputs.append(helper.make_tensor_value_info("position_ids", i64, ["batch", "sequence"]))
    inputs += [helper.make_tensor_value_info("attention_bias", f32, ["batch", 1, "sequence", "total"]),
               helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
               helper.make_tensor_value_info("total_sequence_length", i32, [])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1, config.vocab_size])]
    for i in range(config.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", f32, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", f32, cache_shape))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                             producer_name="llm-backend-bench ort_decoder")


def _split(node, x: str, i: int) -> tuple[str, str]:
    """SwiGLU's stacked gate|up halves (gate first), by opset 17's Split (equal halves by default)."""
    return node("Split", [x], [f"/h.{i}/mlp/gate", f"/h.{i}/mlp/up"], f"/h.{i}/mlp/split", axis=-1)


@dataclass
class DecoderCache:
    """Per layer and kind one (B, n_kv_head, capacity, head_dim) buffer, written in place by every step.

    ``arrays`` own the memory and ``values`` are ORT's views of them. ``length`` positions are
    filled; ``mask`` (B, length) is None while no row is padded. ``state`` is shared by every
    cache object over the same buffers: a step moves it on, so decoding again from an older
    object (whose keys the buffers no longer hold alone) is refused instead of silently wrong.
    """

    arrays: list
    values: list
    length: int
    batch: int
    mask: np.ndarray | None
    state: dict

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]


def new_cache(config, batch: int, capacity: int) -> DecoderCache:
    import onnxruntime as ort
    shape = (batch, config.n_kv_head, max(capacity, MIN_CAPACITY), config.head_dim)
    arrays = [np.zeros(shape, np.float32) for _ in range(2 * config.n_layer)]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    return DecoderCache(arrays, values, 0, batch, None, {"length": 0})


def grown(cache: DecoderCache, needed: int) -> DecoderCache:
    """The cache with room for ``needed`` positions: the same one, or one copy into buffers twice as long."""
    import onnxruntime as ort
    if needed <= cache.capacity:
        return cache
    capacity = max(2 * cache.capacity, needed)
    arrays = []
    for a in cache.arrays:
        b = np.zeros(a.shape[:2] + (capacity,) + a.shape[3:], np.float32)
        b[:, :, :cache.length] = a[:, :, :cache.length]
        arrays.append(b)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    return DecoderCache(arrays, values, cache.length, cache.batch, cache.mask, {"length": cache.length})


def attention_bias(T: int, past_len: int, mask: np.ndarray | None, batch: int) -> np.ndarray:
    """(B, 1, T, past_len + T): 0 where query i (at past_len + i) may see key j, MASKED where not.

    GroupQueryAttention applies causality itself; the bias adds the padding (and repeats the
    causal rule, so the bias alone is the whole rule). A query always sees itself."""
    S = past_len + T
    if mask is None:
        return np.zeros((batch, 1, T, S), np.float32)
    q = np.arange(T)[:, None] + past_len
    k = np.arange(S)[None, :]
    allowed = (k <= q)[None] & (mask[:, None, :].astype(bool) | (k == q)[None])
    return np.where(allowed, 0.0, MASKED).astype(np.float32)[:, None]


def reordered(cache: DecoderCache, index: np.ndarray) -> DecoderCache:
    """New buffers holding the rows ``index`` (beam search)."""
    import onnxruntime as ort
    arrays = [np.ascontiguousarray(a[index]) for a in cache.arrays]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    mask = None if cache.mask is None else cache.mask[index]
    return DecoderCache(arrays, values, cache.length, len(index), mask, {"length": cache.length})
