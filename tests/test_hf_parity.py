"""A Hugging Face GPT-2 checkpoint loads through load_checkpoint and computes what HF computes.

The HF model is randomly initialised and saved locally; nothing is downloaded (conftest sets
HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json

import pytest
import torch

from backends.eager import EagerBackend
from model.checkpoint import CheckpointError, load_checkpoint
from model.generate import generate

transformers = pytest.importorskip("transformers", reason="transformers is missing: pip install transformers")

ATOL = 1e-4
STEPS = 10
PROMPTS = [[10, 20, 30, 40, 50], [7, 8, 9]]


@pytest.fixture(scope="module")
def hf_model():
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=512, n_positions=256,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets LayerNorms to 1: perturb them all
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def safetensors_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-safetensors")
    hf_model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return path


def write_torch_checkpoint(hf_model, path, bare: bool):
    """The legacy ``pytorch_model.bin`` layout: a pickled state_dict beside config.json.

    bare: strip the "transformer." prefix and add the attention-mask buffers, as in the
    original OpenAI GPT-2 files on the Hub.
    """
    path.mkdir()
    hf_model.config.to_json_file(path / "config.json")
    state = hf_model.state_dict()
    if bare:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n = hf_model.config.n_positions
        for i in range(hf_model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module", params=["safetensors", "pytorch_model.bin", "bare pytorch_model.bin"])
def checkpoint_dir(request, hf_model, safetensors_dir, tmp_path_factory):
    if request.param == "safetensors":
        return safetensors_dir
    return write_torch_checkpoint(hf_model, tmp_path_factory.mktemp("hf-bin") / "ckpt",
                                  bare=request.param.startswith("bare"))


def test_config_maps_to_ours(checkpoint_dir):
    config = load_checkpoint(checkpoint_dir).config
    sizes = (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size)
    assert sizes == (2, 4, 128, 512, 256)
    assert config.tie_embeddings and config.pos_encoding == "learned"


def test_logits_match_hf(checkpoint_dir, hf_model):
    ours = load_checkpoint(checkpoint_dir)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_model(ids).logits
        got, _ = ours(ids)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_greedy_tokens_match_hf_generate(checkpoint_dir, hf_model):
    backend = EagerBackend()
    backend.load(load_checkpoint(checkpoint_dir))
    for prompt in PROMPTS:
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False)
        assert generate(backend, [prompt], STEPS) == [want[0, len(prompt):].tolist()]


def test_left_padded_batch_matches_hf_generate(safetensors_dir, hf_model):
    backend = EagerBackend()
    backend.load(load_checkpoint(safetensors_dir))
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    want = hf_model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
    assert generate(backend, PROMPTS, STEPS, pad_token_id=0) == want[:, T:].tolist()


def test_repetition_penalty_matches_hf_generate(safetensors_dir, hf_model):
    backend = EagerBackend()
    backend.load(load_checkpoint(safetensors_dir))
    prompt = PROMPTS[0]
    want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False,
                             repetition_penalty=1.5)
    got = generate(backend, [prompt], STEPS, repetition_penalty=1.5)
    assert got == [want[0, len(prompt):].tolist()]
    assert got != generate(backend, [prompt], STEPS)  # the penalty changed the answer


def test_unsupported_activation_is_refused(safetensors_dir, tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((safetensors_dir / f).read_bytes())
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json: activation_function='relu'"):
        load_checkpoint(tmp_path)


def test_conv1d_shape_error_names_the_file_layout(safetensors_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    (tmp_path / "config.json").write_bytes((safetensors_dir / "config.json").read_bytes())
    state = load_file(str(safetensors_dir / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = state["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    # HF stores Conv1D as (in, out): the expected shape is the file's, (128, 512), not ours.
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' has shape \(512, 128\), "
                                              r"expected \(128, 512\)"):
        load_checkpoint(tmp_path)
