"""Checkpoints (our format round trip, every error named) and tokenizers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.gpt import build_model, get_config
from model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


@pytest.fixture
def saved(tmp_path, tiny_model):
    return save_checkpoint(tiny_model, tmp_path / "ckpt")


# -- round trip ----------------------------------------------------------------------------
def test_round_trip_gives_identical_logits(saved, tiny_model):
    loaded = load_checkpoint(saved)
    assert loaded.config == tiny_model.config
    assert not loaded.training
    assert torch.equal(logits_of(loaded), logits_of(tiny_model))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied, not two copies
    assert sum(p.numel() for p in loaded.parameters()) == tiny_model.config.n_params
    assert json.loads((saved / "config.json").read_text())["format"] == "llm-backend-bench/gpt"


def test_round_trip_of_untied_sinusoidal_model(tmp_path):
    model = build_model(get_config("tiny", pos_encoding="sinusoidal", tie_embeddings=False), seed=5)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path))
    assert loaded.config == model.config
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    assert torch.equal(logits_of(loaded), logits_of(model))


# -- errors, each naming the file and the tensor -------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_checkpoint(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights file.*model\.safetensors.*pytorch_model\.bin"):
        load_checkpoint(saved)


def test_unparseable_config(saved):
    (saved / "config.json").write_text('{"format": "llm-backend-bench/gpt", ')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(saved)


def test_unrecognised_config(saved):
    (saved / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    match = r"config\.json: not a recognised checkpoint.*'phi3' is not one of gpt2, llama, mistral, qwen2"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(saved)


def test_invalid_config_values(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["n_head"] = 3
    (saved / "config.json").write_text(json.dumps(meta))
    match = r"config\.json: invalid config: n_embd=128 is not divisible by n_head=3"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(saved)


def test_unknown_config_field(saved):
    meta = json.loads((saved / "config.json").read_text())
    meta["config"]["n_experts"] = 8
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: .*n_experts"):
        load_checkpoint(saved)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ", b"garbage" * 10])
def test_corrupt_safetensors(saved, content):
    (saved / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_checkpoint(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load_checkpoint(saved)


def rewrite_weights(directory, change) -> None:
    state = load_file(str(directory / "model.safetensors"))
    change(state)
    save_file(state, str(directory / "model.safetensors"))


def test_missing_tensor(saved):
    rewrite_weights(saved, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    match = r"model\.safetensors: missing tensor 'transformer\.h\.1\.mlp\.c_fc\.bias'"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(saved)


def test_wrong_shape(saved):
    def shrink(state):
        state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(384, 64)
    rewrite_weights(saved, shrink)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight' has shape \(384, 64\), "
                                              r"expected \(384, 128\)"):
        load_checkpoint(saved)


def test_unexpected_tensor(saved):
    def add(state):
        state["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(16)
    rewrite_weights(saved, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.rotary\.inv_freq'"):
        load_checkpoint(saved)


def test_corrupt_torch_file(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read torch file"):
        load_checkpoint(saved)


def test_torch_file_that_is_not_a_state_dict(saved):
    (saved / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: expected a dict of tensors"):
        load_checkpoint(saved)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# -- tokenizers ----------------------------------------------------------------------------
def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer(512)
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text


def test_byte_tokenizer_renders_eos_and_model_only_ids():
    tok = ByteTokenizer(512)
    assert tok.eos_token_id == 256
    assert tok.decode([104, 105, 256, 300, 33]) == "hi<|endoftext|><|300|>!"
    assert ByteTokenizer(256).eos_token_id is None  # no room for an EOS id
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut-off character is shown, not dropped


def test_byte_tokenizer_rejects_ids_outside_its_vocabulary():
    with pytest.raises(ValueError, match="token id 512"):
        ByteTokenizer(512).decode([1, 512])
    with pytest.raises(ValueError, match="vocab_size=100"):
        ByteTokenizer(100)


def test_load_tokenizer_without_a_tokenizer_file_is_bytes(saved):
    assert isinstance(load_tokenizer(None, 512), ByteTokenizer)
    assert isinstance(load_tokenizer(saved, 512), ByteTokenizer)


def write_word_tokenizer(directory, words: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def test_load_tokenizer_uses_tokenizer_json(saved):
    write_word_tokenizer(saved, ["hello", "world"])
    tok = load_tokenizer(saved, 512)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [2, 3]
    assert tok.encode("unseen") == [0]
    assert tok.eos_token_id == 1  # found by GPT-2's end-of-text name
    assert tok.decode([2, 3]) == "hello world"


def test_load_tokenizer_refuses_a_vocabulary_larger_than_the_model(saved):
    write_word_tokenizer(saved, [f"w{i}" for i in range(20)])
    with pytest.raises(ValueError, match="22 tokens but the model's vocab_size=16"):
        load_tokenizer(saved, 16)
