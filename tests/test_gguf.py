"""GGUF I/O (model/gguf.py): our model written as llama.cpp's gpt2/llama/qwen2 and read back.

The writer's tensors, layouts and keys are checked here by reading the file back (gguf-py's
reader and ours) and, where llama-cpp-python is installed, by llama.cpp's own tokenizer; that
llama.cpp computes our logits from the files is tests/test_llamacpp.py's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.gpt import build_model, get_config
from tests.lively import lively

gguf = pytest.importorskip("gguf", reason="gguf is missing: pip install gguf")

from model.gguf import (GENERATED_VOCAB, GGUFError, _permute, _unpermute, gguf_architecture,  # noqa: E402
                        load_gguf, read_gguf_config, save_gguf)


def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason='llama_cpp is missing: CMAKE_ARGS="-DGGML_NATIVE=ON" '
                                                   'pip install llama-cpp-python==0.3.36')


def tensors(path) -> dict[str, np.ndarray]:
    """The file's tensors in our (out, in) orientation, as stored (f32 files only)."""
    return {t.name: np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))
            for t in gguf.GGUFReader(str(path)).tensors}


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))

ROUND_TRIPS = [
    ("tiny", {}),
    ("llama-tiny", {}),
    ("llama-tiny", dict(qkv_bias=True)),  # qwen2
    ("llama-tiny", dict(tie_embeddings=False, rope_scaling="llama3", rope_factor=8.0, rope_original_context=64)),
    ("llama-tiny", dict(sliding_window=8, rope_scaling="linear", rope_factor=2.0, qkv_bias=True, out_bias=True,
                        mlp_bias=True)),  # llama with every bias
]


@pytest.mark.parametrize("preset, overrides", ROUND_TRIPS, ids=lambda v: str(v))
def test_f32_round_trip_gives_equal_logits(tmp_path, preset, overrides):
    model = lively(preset, **overrides)
    written = save_gguf(model, tmp_path / "m.gguf", "f32")
    assert written["tensor_types"] == {"f32": len(tensors(tmp_path / "m.gguf"))}
    back = load_gguf(tmp_path / "m.gguf")
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    with torch.no_grad():
        want, got = model(IDS)[0], back(IDS)[0]
    assert want.abs().max() > 1.0
    assert torch.equal(got, want)
    assert back.gguf_source["file_type"] == "f32" and back.gguf_source["dequantized"] == []


@pytest.mark.parametrize("overrides, arch", [({}, "llama"), (dict(qkv_bias=True), "qwen2"),
                                             (dict(qkv_bias=True, out_bias=True), "llama"),
                                             (dict(sliding_window=64), "llama")])
def test_llama_family_architecture(tmp_path, overrides, arch):
    config = get_config("llama-tiny", **overrides)
    assert gguf_architecture(config) == arch
    assert gguf_architecture(get_config("tiny")) == "gpt2"
    save_gguf(build_model(config), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.attention.head_count_kv"].contents() == 2
    assert reader.fields[f"{arch}.rope.dimension_count"].contents() == config.head_dim


@pytest.mark.parametrize("overrides, permuted", [({}, True), (dict(qkv_bias=True), False)])
def test_q_and_k_rows_pair_as_the_architecture_rotates(tmp_path, overrides, permuted):
    """llama rotates neighbouring dimensions, so its q/k rows are permuted; qwen2 rotates the halves as we do."""
    model = lively("llama-tiny", **overrides)
    save_gguf(model, tmp_path / "m.gguf")
    file = tensors(tmp_path / "m.gguf")
    C, KV = model.config.n_embd, model.config.kv_dim
    q, k, v = model.transformer.h[0].attn.c_attn.weight.detach().split([C, KV, KV])
    want_q = _permute(q, model.config.n_head) if permuted else q
    want_k = _permute(k, model.config.n_kv_head) if permuted else k
    assert np.array_equal(file["blk.0.attn_q.weight"], want_q.numpy())
    assert np.array_equal(file["blk.0.attn_k.weight"], want_k.numpy())
    assert np.array_equal(file["blk.0.attn_v.weight"], v.numpy())  # values never rotate
    assert permuted == (not np.array_equal(file["blk.0.attn_q.weight"], q.numpy()))


def test_permutation_pairs_dimension_i_with_i_plus_half():
    D = 8
    rows = torch.arange(2 * D, dtype=torch.float32).unsqueeze(1)  # two heads of 8 rows
    p = _permute(rows, 2).squeeze(1).tolist()
    assert p[:D] == [0, 4, 1, 5, 2, 6, 3, 7]  # neighbours (2i, 2i+1) are ours (i, i + D/2)
    assert p[D:] == [8, 12, 9, 13, 10, 14, 11, 15]
    w = torch.randn(3 * 16, 5)
    assert torch.equal(_unpermute(_permute(w, 3), 3), w)


def test_llama3_scaling_is_written_as_rope_freqs(tmp_path):
    from model.gpt import rope_inv_freq
    config = get_config("llama-tiny", rope_scaling="llama3", rope_factor=8.0, rope_original_context=64)
    save_gguf(build_model(config), tmp_path / "m.gguf")
    factors = tensors(tmp_path / "m.gguf")["rope_freqs.weight"]
    plain = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim))
    np.testing.assert_allclose(plain / factors, rope_inv_freq(config).numpy(), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0  # high frequencies kept, low ones slowed
    assert "rope_freqs.weight" not in tensors(save_path(tmp_path, get_config("llama-tiny")))


def save_path(tmp_path, config):
    path = tmp_path / "plain.gguf"
    save_gguf(build_model(config), path)
    return path


@pytest.mark.parametrize("ftype, dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_hold_the_rounded_matrices(tmp_path, ftype, dtype):
    model = lively("llama-tiny")
    written = save_gguf(model, tmp_path / "m.gguf", ftype)
    assert written["tensor_types"] == {ftype: 15, "f32": 5}  # 2 norms per block and the final one stay f32
    back = load_gguf(tmp_path / "m.gguf")
    for name, t in model.state_dict().items():
        want = t if t.dim() == 1 else t.to(dtype).float()
        assert torch.equal(back.state_dict()[name], want), name
    assert back.gguf_source["file_type"] == ftype


def test_quantised_files_load_dequantised(tmp_path):
    llama_cpp_or_skip()
    model = lively("tiny")
    for ftype in ("q8_0", "q4_K_M"):
        written = save_gguf(model, tmp_path / f"{ftype}.gguf", ftype, threads=1)
        assert written["quantizer"] == "llama.cpp llama_model_quantize"
        back = load_gguf(tmp_path / f"{ftype}.gguf")
        assert back.gguf_source["file_type"] == ftype
        assert back.gguf_source["tensor_types"] == written["tensor_types"]
        assert len(back.gguf_source["dequantized"]) == 9  # every matrix but the position table
        with torch.no_grad():
            want, got = model(IDS)[0], back(IDS)[0]
        assert 0 < float((got - want).abs().max()) < 2.0
        assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.75
    assert written["tensor_types"]["q4_K"] == 1  # llama.cpp's own mix: q4_K where 256 divides (the head)


def test_generated_vocabulary_tokenizes_as_the_byte_tokenizer(tmp_path):
    llama_cpp = llama_cpp_or_skip()
    from model.tokenizer import ByteTokenizer
    path = tmp_path / "m.gguf"
    assert save_gguf(build_model(get_config("tiny")), path)["tokenizer"] == GENERATED_VOCAB
    text = "Hi there,\n  héllo wörld 123! <|endoftext|>"
    ids, pieces = llama_tokenize(llama_cpp, path, text)
    assert ids == ByteTokenizer(512).encode(text)
    assert pieces == text.encode()


def test_a_checkpoint_bpe_tokenizer_is_written_as_it_is(tmp_path):
    llama_cpp = llama_cpp_or_skip()
    from model.tokenizer import train_bpe
    texts = ["the quick brown fox jumps over the lazy dog ", "hello world, hello there 1234 "] * 20
    tok = train_bpe(texts, 300)
    path = tmp_path / "m.gguf"
    assert save_gguf(build_model(get_config("tiny")), path, tokenizer=tok)["tokenizer"].startswith(
        "the model's tokenizer.json (byte-level BPE)")
    text = "the quick brown fox, hello there 1234\n  héllo"
    ids, pieces = llama_tokenize(llama_cpp, path, text)
    assert ids == tok.encode(text) and len(ids) < len(text.encode())  # merges applied
    assert pieces == text.encode()


def llama_tokenize(llama_cpp, path, text: str) -> tuple[list[int], bytes]:
    """llama.cpp's own tokenization of ``text`` with the file's vocabulary, and the pieces back."""
    import ctypes
    from model.gguf import quiet_llama_cpp
    quiet_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, "llama.cpp refused the file"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        raw = text.encode()
        buf = (llama_cpp.llama_token * 256)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, 256, False, False)
        ids = list(buf[:n])
        pieces = b""
        for t in ids:
            out = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(vocab, t, out, 64, 0, True)
            pieces += out.raw[:n]
        return ids, pieces
    finally:
        llama_cpp.llama_model_free(model)


# -- refusals -----------------------------------------------------------------------------------

def test_a_model_no_architecture_computes_is_refused(tmp_path):
    with pytest.raises(GGUFError, match="pos_encoding='sinusoidal' has no GGUF equivalent"):
        save_gguf(build_model(get_config("tiny", pos_encoding="sinusoidal")), tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match="unknown GGUF type 'q3_K'"):
        save_gguf(build_model(get_config("tiny")), tmp_path / "m.gguf", "q3_K")
    with pytest.raises(GGUFError, match="vocab_size=200 is too small"):
        save_gguf(build_model(get_config("tiny", vocab_size=200)), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()  # refused before anything was written


def test_an_unsupported_architecture_is_one_line(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="GGUF architecture 'falcon' is not supported; supported: gpt2, llama, qwen2"):
        load_gguf(path)
    with pytest.raises(GGUFError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")


def test_an_unsupported_tensor_type_is_one_line(tmp_path):
    llama_cpp = llama_cpp_or_skip()
    from model.gguf import quiet_llama_cpp
    f32, iq4 = tmp_path / "m.gguf", tmp_path / "iq4.gguf"
    save_gguf(build_model(get_config("tiny")), f32)
    quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(iq4).encode(), params) == 0
    with pytest.raises(GGUFError, match=r"tensor \S+ is IQ4_NL; supported types: F32, F16, BF16, Q8_0, Q4_0"):
        load_gguf(iq4)


# -- as a checkpoint ----------------------------------------------------------------------------

def test_a_gguf_file_is_taken_where_a_checkpoint_is(tmp_path):
    from bench.models import is_checkpoint_dir, model_config, open_model, reference_model
    from model.checkpoint import load_checkpoint, read_config
    model = lively("llama-tiny")
    path = tmp_path / "model.gguf"
    save_gguf(model, path)
    assert is_checkpoint_dir(str(path)) and not is_checkpoint_dir(str(tmp_path / "other.gguf"))
    assert read_config(path) == model_config(str(path)) == model.config == read_gguf_config(path)[0]
    for loaded in (load_checkpoint(path), open_model(str(path), "llamacpp", "fp32"), reference_model(str(path))):
        assert loaded.gguf_source["path"] == str(path.resolve())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    recorded = json.loads(gguf.GGUFReader(str(path)).fields["llm_backend_bench.config"].contents())
    assert recorded == model.config.to_dict()
