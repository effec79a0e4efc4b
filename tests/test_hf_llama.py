"""Llama-family Hugging Face checkpoints in and out: Llama, Mistral and Qwen2 directories saved by
transformers load through load_checkpoint and compute what transformers computes; save_hf writes
our Llama-family models back as directories transformers loads; what cannot load is one line.

Every transformers model here is random (initializer_range 0.2 and perturbed norms and biases, so
greedy generation does not collapse onto one token) and saved locally; nothing is downloaded
(conftest sets HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json

import pytest
import torch

from backends.eager import EagerBackend
from bench.cli import main
from model.checkpoint import CheckpointError, load_checkpoint, read_config
from model.generate import generate
from model.gpt import build_model, get_config
from tests.lively import lively

transformers = pytest.importorskip("transformers", reason="transformers is missing: pip install transformers")

ATOL = 1e-4
DECODE_STEPS = 30
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)

# (transformers class, its config's fields beyond TINY): one checkpoint each.
CASES = {
    "llama-gqa-tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa-untied": ("LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "llama-llama3-rope": ("LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3,
                                                   tie_word_embeddings=True)),
    "llama-linear-rope-biases": ("LlamaForCausalLM", dict(num_key_value_heads=4, rope_scaling=dict(type="linear",
                                                          factor=4.0), attention_bias=True, mlp_bias=True)),
    "qwen2-biases-tied": ("Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                   rope_theta=1000000.0, rms_norm_eps=1e-5)),
    "qwen2-mqa-untied": ("Qwen2ForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    "mistral-window-untied": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8)),
    "mistral-no-window-tied": ("MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None,
                                                         tie_word_embeddings=True)),
}


def hf_model(case: str, seed: int = 0, dtype=torch.float32, **overrides):
    """The transformers model of ``case``, random and lively: norms and biases perturbed too."""
    architecture, fields = CASES[case]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config_class(**{**TINY, **fields, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype)


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(transformers model, the directory its save_pretrained wrote)."""
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def greedy(step, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Prefill ``ids`` and decode ``steps`` greedy tokens one at a time through ``step(ids, past)
    -> (logits, past)``; returns every step's last logits and the tokens chosen."""
    logits, past = step(ids, None)
    seen, tokens = [logits[:, -1]], []
    for _ in range(steps):
        token = seen[-1].argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(token[:, 0].tolist())
        logits, past = step(token, past)
        seen.append(logits[:, -1])
    return seen, tokens


def hf_step(model):
    def step(ids, past):
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values
    return step


def our_step(model):
    def step(ids, past):
        return model(ids, past=past)
    return step


# -- loading: logits and greedy tokens as transformers' ------------------------------------------

def test_config_maps_every_field(saved):
    hf, path = saved
    c, theirs = read_config(path), hf.config
    assert c.family == "llama"
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.intermediate_size, c.vocab_size, c.block_size) == (
        theirs.num_hidden_layers, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.hidden_size,
        theirs.intermediate_size, theirs.vocab_size, theirs.max_position_embeddings)
    assert (c.layer_norm_epsilon, c.rope_theta, c.tie_embeddings) == (
        theirs.rms_norm_eps, theirs.rope_theta, theirs.tie_word_embeddings)
    assert c.sliding_window == getattr(theirs, "sliding_window", None)
    if theirs.model_type == "qwen2":
        assert (c.qkv_bias, c.out_bias, c.mlp_bias) == (True, False, False)
    elif theirs.model_type == "llama":
        assert (c.qkv_bias, c.out_bias, c.mlp_bias) == (theirs.attention_bias,) * 2 + (theirs.mlp_bias,)
    scaling = getattr(theirs, "rope_scaling", None) or {}
    assert c.rope_scaling == scaling.get("rope_type", "none")
    if c.rope_scaling != "none":
        assert c.rope_factor == scaling["factor"]
    if c.rope_scaling == "llama3":
        assert (c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_context) == (1.0, 4.0, 32)


def test_logits_and_greedy_decode_equal_transformers(saved):
    hf, path = saved
    ours = load_checkpoint(path)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == hf.config.tie_word_embeddings
    assert sum(p.numel() for p in ours.parameters()) == ours.config.n_params == hf.num_parameters()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_tokens = greedy(hf_step(hf), ids, DECODE_STEPS)
        got, got_tokens = greedy(our_step(ours), ids, DECODE_STEPS)
    assert want[0].abs().max() > 1.0  # not two near-zero tensors
    assert len({t for row in want_tokens for t in row}) > 10  # greedy does not collapse onto a few tokens
    assert got_tokens == want_tokens
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"step {i}: {m}")
    with torch.no_grad():  # and every position of one prefill
        torch.testing.assert_close(ours(ids)[0], hf(ids).logits, atol=ATOL, rtol=0)


def test_left_padded_generation_equals_transformers_generate(tmp_path):
    hf = hf_model("llama-gqa-tied")
    hf.save_pretrained(tmp_path)
    prompts = [[10, 20, 30, 40, 50, 60], [7, 8, 9]]
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    with EagerBackend() as backend:
        backend.load(load_checkpoint(tmp_path))
        assert generate(backend, prompts, 12, pad_token_id=0) == want[:, T:].tolist()


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("llama-mqa-untied")
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path)(ids)[0], hf(ids).logits, atol=ATOL, rtol=0)
    from model.checkpoint import weights_files
    assert [p.name for p in weights_files(tmp_path)] == ["model.safetensors.index.json", *shards]


def test_a_quantised_sharded_checkpoint_is_checked_against_all_its_shards(tmp_path):
    """bench quantize from a sharded directory records a digest of every shard; the parity reference
    of the quantised file is that source, and a changed shard is named, not silently used."""
    from bench.models import reference_model
    from bench.quantize import quantize_checkpoint
    from model.checkpoint import CheckpointError

    src = tmp_path / "src"
    hf_model("llama-mqa-untied").save_pretrained(src, max_shard_size="60KB")
    out = tmp_path / "int8"
    result = quantize_checkpoint(src, "int8", out)
    assert result["source_bytes"] == sum(f.stat().st_size for f in src.iterdir() if f.name.startswith("model"))
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reference_model(out)(ids)[0], load_checkpoint(src)(ids)[0])
    last = sorted(src.glob("model-*-of-*.safetensors"))[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last shard's last tensor
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="now holds other weights"):
        reference_model(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_as_fp32(dtype, tmp_path):
    hf = hf_model("qwen2-biases-tied", dtype=dtype)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    ours = load_checkpoint(tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(ours.transformer.h[1].attn.c_attn.weight[:64], q.float())  # exactly the file's values
    # transformers' own fp32 reading of the same file (hf.float() would keep its rotary table's
    # frequencies rounded to 16 bits, which a fresh load computes in fp32)
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, local_files_only=True)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], want(ids).logits, atol=ATOL, rtol=0)


def test_old_rotary_buffers_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = hf_model("llama-gqa-tied")
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # as transformers < 4.31 saved
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    load_checkpoint(tmp_path)


# -- what does not load: one line naming the field and what is supported ----------------------------

def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


_DROP = object()


@pytest.mark.parametrize("case, changes, message", [
    ("llama-gqa-tied", dict(model_type="phi3"),
     "model_type='phi3' is not one of gpt2, llama, mistral, qwen2"),
    ("llama-gqa-tied", dict(architectures=["LlamaForSequenceClassification"]),
     "architectures=['LlamaForSequenceClassification'] is not supported; supported: ['LlamaForCausalLM']"),
    ("llama-gqa-tied", dict(hidden_act="gelu"), "hidden_act='gelu' is not supported; supported: silu"),
    ("llama-gqa-tied", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
     "rope_scaling.rope_type='dynamic' is not supported; supported: default, linear, llama3"),
    ("llama-gqa-tied", dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32)),
     "rope_scaling.rope_type='yarn' is not supported"),
    ("llama-gqa-tied", dict(rope_scaling=dict(rope_type="longrope", long_factor=[1.0], short_factor=[1.0])),
     "rope_scaling.rope_type='longrope' is not supported"),
    ("llama-gqa-tied", dict(rope_scaling=dict(rope_type="llama3", factor=8.0)),
     "rope_scaling.low_freq_factor=None is not supported; supported: a number, which rope_type 'llama3' needs"),
    ("llama-gqa-tied", dict(head_dim=32), "head_dim=32 is not supported; supported: hidden_size / "
                                          "num_attention_heads = 64 / 4"),
    ("llama-gqa-tied", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    ("llama-gqa-tied", dict(quantization_config=dict(quant_method="gptq", bits=4)),
     "quantization_config.quant_method='gptq' is not supported"),
    ("qwen2-biases-tied", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window=True is not supported"),
    ("llama-gqa-tied", dict(num_attention_heads=6, head_dim=_DROP),
     "invalid config: n_embd=64 is not divisible by n_head=6"),
    ("qwen2-biases-tied", dict(layer_types=["full_attention", "sliding_attention"]),
     "layer_types=['full_attention', 'sliding_attention'] is not supported; supported: full_attention in every layer"),
    ("llama-gqa-tied", dict(rope_scaling=dict(type="linear", rope_type="llama3", factor=2.0)),
     "rope_scaling.type='linear' is not supported; supported: the same as rope_type='llama3'"),
    ("llama-gqa-tied", dict(num_key_value_heads=1), "tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                                    "(32, 64), expected (16, 64)"),
    ("llama-gqa-tied", dict(tie_word_embeddings=False), "missing tensor 'lm_head.weight' (tie_word_embeddings is "
                                                        "false: an untied head needs it)"),
    ("mistral-window-untied", dict(sliding_window=0), "sliding_window=0 must be a positive integer"),
])
def test_unsupported_config_is_one_line(case, changes, message, tmp_path):
    hf_model(case).save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(tmp_path) in str(e.value)


def test_unsupported_checkpoint_is_one_line_and_exit_2_from_the_cli(tmp_path, capsys):
    hf_model("llama-gqa-tied").save_pretrained(tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", rope_scaling=dict(rope_type="yarn", factor=4.0))
    assert main(["convert", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "rope_scaling.rope_type='yarn'" in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("damage, message", [
    ("drop-shard", r"shard 'model-00002-of-0000N\.safetensors' named in weight_map is not a file"),
    ("bad-map", "weight_map must be a non-empty object"),
    ("misplaced", "which model.safetensors.index.json (maps to|says it holds)"),
])
def test_damaged_sharded_set_is_one_line(damage, message, tmp_path):
    hf_model("llama-mqa-untied").save_pretrained(tmp_path, max_shard_size="60KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    message = message.replace("0000N", f"{len(shards):05d}")
    if damage == "drop-shard":
        (tmp_path / shards[1]).unlink()
    elif damage == "bad-map":
        index["weight_map"] = []
    else:  # the index says a tensor lives in another shard than the one that holds it
        name = next(n for n, s in index["weight_map"].items() if s == shards[0])
        index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


# -- writing: save_hf for each family ---------------------------------------------------------------

WRITE_CASES = {  # our config -> the class it is written as
    "llama": ({}, "LlamaForCausalLM"),
    "llama-biases-llama3-untied": (dict(qkv_bias=True, out_bias=True, mlp_bias=True, rope_scaling="llama3",
                                        rope_factor=8.0, rope_original_context=32, tie_embeddings=False),
                                   "LlamaForCausalLM"),
    "llama-linear-mqa": (dict(n_kv_head=1, rope_scaling="linear", rope_factor=2.0), "LlamaForCausalLM"),
    "qwen2": (dict(qkv_bias=True, rope_theta=1e6), "Qwen2ForCausalLM"),
    "mistral": (dict(sliding_window=6, tie_embeddings=False), "MistralForCausalLM"),
    "gpt2": (None, "GPT2LMHeadModel"),
}


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_save_hf_round_trip(case, tmp_path):
    from model.hf import save_hf
    overrides, architecture = WRITE_CASES[case]
    ours = lively("tiny") if overrides is None else lively("llama-tiny", **overrides)
    save_hf(ours, tmp_path)
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    back = load_checkpoint(tmp_path)  # our loader reads it back, bit for bit
    assert back.config == ours.config
    assert ours.state_dict().keys() == back.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = ours(ids)
        got = hf(ids).logits
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_to_hf_model_holds_our_weights():
    from model.hf import to_hf_model
    ours = lively("llama-tiny", qkv_bias=True)
    hf = to_hf_model(ours)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    (dict(sliding_window=8, qkv_bias=True), "sliding_window=8 with biases"),
    (dict(qkv_bias=False, out_bias=True), "qkv_bias=False with out_bias=True has no Hugging Face equivalent"),
    (dict(qkv_bias=True, mlp_bias=True), "qkv_bias=True with out_bias=False has no Hugging Face equivalent"),
])
def test_inexpressible_llama_configs_are_refused(overrides, message, tmp_path):
    from model.hf import ConvertError, save_hf
    with pytest.raises(ConvertError, match=message):
        save_hf(build_model(get_config("llama-tiny", **overrides)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_head=2), "n_kv_head=2 has no Hugging Face GPT-2 equivalent"),
    (dict(norm="rmsnorm"), "norm='rmsnorm' has no Hugging Face GPT-2 equivalent"),
    (dict(qkv_bias=False), "qkv_bias=False has no Hugging Face GPT-2 equivalent"),
    (dict(intermediate_size=100), "intermediate_size=100 has no Hugging Face GPT-2 equivalent"),
])
def test_inexpressible_gpt2_configs_are_refused(overrides, message, tmp_path):
    from model.hf import ConvertError, save_hf
    with pytest.raises(ConvertError, match=message):
        save_hf(build_model(get_config("tiny", **overrides)), tmp_path)


def test_bench_convert_writes_a_llama_family_preset(tmp_path, capsys):
    out = tmp_path / "llama"
    assert main(["convert", "--to", "hf", "--model", "llama-tiny", "--seed", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    ours = build_model(get_config("llama-tiny"), seed=4)
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-5, rtol=0)


# -- a Llama-style tokenizer.json ------------------------------------------------------------------

def llama_style_tokenizer():
    """A byte-level BPE with Llama's special tokens (<unk> 0, <s> 1, </s> 2) and its post-processor,
    which puts <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def test_llama_style_tokenizer_json_loads_and_is_written_back(tmp_path):
    from model.hf import convert
    from model.tokenizer import HFTokenizer, load_tokenizer
    ckpt = tmp_path / "ckpt"
    hf_model("llama-gqa-tied", vocab_size=320).save_pretrained(ckpt)  # config.json: bos_token_id 1, eos 2
    raw = llama_style_tokenizer()
    raw.save(str(ckpt / "tokenizer.json"))
    tok = load_tokenizer(ckpt, 320)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "the lazy fox"
    assert tok.encode(text) == raw.encode(text).ids[1:]  # our encode adds no special token; theirs adds <s>
    assert raw.encode(text).ids[0] == 1
    assert tok.decode(tok.encode(text)) == text

    out = convert(tmp_path / "hf", checkpoint=ckpt)
    fast = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (fast.bos_token, fast.eos_token, fast.unk_token) == ("<s>", "</s>", "<unk>")
    assert fast.encode(text) == raw.encode(text).ids  # the post-processor travels with it
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["bos_token_id"], config["eos_token_id"]) == (["LlamaForCausalLM"], 1, 2)
