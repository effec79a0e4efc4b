"""``bench inspect``: the attention weights the forward returns are the softmax the model applies
(recomputing each layer's attention output from them and its values gives the layer's own
output), for both families; the parameter table adds up; the page in headless Chromium has one
heatmap per layer and head and no script error; bad input is one line; the dashboard links a
trained run's inspection.
"""

from __future__ import annotations

import torch
import pytest

from bench.cli import main
from model.inspection import architecture, inspect_model, pca_2d
from model.gpt import GPT, build_model, get_config, repeat_kv, rotary_tables
from model.tokenizer import ByteTokenizer

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def layer_outputs_from_weights(model: GPT, inside: dict, presents, pos: torch.Tensor, past_len: int):
    """Per layer: (the attention block's own output on its input, the output rebuilt from the returned weights
    and the layer's values)."""
    config = model.config
    rotary = rotary_tables(config, pos, torch.float32) if config.pos_encoding == "rotary" else None
    out = []
    for i, block in enumerate(model.transformer.h):
        x = inside["hidden"][i]
        B, T, C = x.shape
        attn_mask, is_causal = GPT._attention_mask(T, past_len, None, x.device, config.sliding_window)
        own, _ = block.attn(block.ln_1(x), past_layer(presents, i, past_len), attn_mask, is_causal, rotary)
        v = repeat_kv(presents[i][1], config.n_head // config.n_kv_head)  # (B, n_head, S, head_dim)
        y = (inside["attentions"][i] @ v).transpose(1, 2).reshape(B, T, C)
        out.append((own, block.attn.c_proj(y)))
    return out


def past_layer(presents, i, past_len):
    if not past_len:
        return None
    k, v = presents[i]
    return k[:, :, :past_len], v[:, :, :past_len]


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_returned_attention_weights_are_the_softmax_the_model_applies(preset):
    model = build_model(get_config(preset), seed=1).eval()
    idx = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = model(idx)
        logits, presents, inside = model(idx, return_attention=True)
        assert torch.equal(logits, plain)  # asking for the weights changes nothing computed
        assert len(inside["attentions"]) == model.config.n_layer and len(inside["hidden"]) == model.config.n_layer + 1
        for w in inside["attentions"]:
            assert w.shape == (2, model.config.n_head, 9, 9)
            assert torch.allclose(w.sum(-1), torch.ones(2, model.config.n_head, 9))
            assert bool((w.triu(1) == 0).all())  # causal: nothing after the query
        pos = torch.arange(9).unsqueeze(0).expand(2, 9)
        for own, rebuilt in layer_outputs_from_weights(model, inside, presents, pos, 0):
            assert torch.allclose(own, rebuilt, atol=1e-5, rtol=1e-4)
        # and with a cache: 4 new tokens after 9, under the explicit mask path
        more = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
        _, presents2, inside2 = model(more, past=presents, return_attention=True)
        assert inside2["attentions"][0].shape == (2, model.config.n_head, 4, 13)
        pos2 = torch.arange(9, 13).unsqueeze(0).expand(2, 4)
        for own, rebuilt in layer_outputs_from_weights(model, inside2, presents2, pos2, 9):
            assert torch.allclose(own, rebuilt, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_the_parameter_table_counts_every_parameter_once(preset):
    model = build_model(get_config(preset), seed=0)
    rows = architecture(model)
    assert sum(r["params"] for r in rows) == model.config.n_params
    assert sum(r["bytes"] for r in rows) == 4 * model.config.n_params  # fp32
    head = next(r for r in rows if r["name"] == "lm_head")
    assert head["params"] == 0 and "transformer.wte.weight" in head["tied"]  # tied: counted at the embedding


def test_pca_finds_the_direction_points_spread_along():
    t = torch.linspace(-1, 1, 50).unsqueeze(1)
    points = torch.cat([t * 3, t * 3 + 0.01 * torch.randn(50, 1, generator=torch.Generator().manual_seed(0)),
                        torch.zeros(50, 1)], dim=1)
    coords, explained = pca_2d(points)
    assert explained[0] > 0.99 and coords.shape == (50, 2)
    assert torch.allclose(coords[:, 0].abs(), (t.squeeze(1) * 3 * 2 ** 0.5).abs(), atol=0.05)


def test_inspect_data_labels_tokens_and_bounds_the_entropy():
    model = build_model(get_config("tiny"), seed=0)
    result = inspect_model(model, ByteTokenizer(512), "ab c\né", frequency_bytes=20_000)
    assert result["tokens"] == ["a", "b", "·", "c", "\\n", "#195", "#169"]  # é is two bytes, not text alone
    assert len(result["entropy_bits"]) == 2 and all(0 <= h <= 3 for row in result["entropy_bits"] for h in row)
    assert "Python standard library" in result["embeddings"]["frequency_source"]
    assert result["embeddings"]["labelled"][0]["count"] >= result["embeddings"]["labelled"][-1]["count"]


def test_bench_inspect_writes_a_page_with_a_heatmap_per_layer_and_head(tmp_path, capsys, browser):
    out = tmp_path / "inspect"
    assert main(["inspect", "--model", "llama-tiny", "--prompt", f"x = 1 {HOSTILE}", "--out", str(out),
                 "--frequency-bytes", "20000"]) == 0
    assert "8 attention heatmaps" in capsys.readouterr().err
    heads = sorted(p.name for p in (out / "heads").glob("*.png"))
    assert heads == [f"layer{i}-head{h}.png" for i in range(2) for h in range(4)]
    for name in ("entropy.png", "embeddings-pca.png", "activation-norms.png", "heads/layer1-head3.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((out / "index.html").as_uri())
    assert page.get_attribute("body", "data-heatmaps") == "8"
    shown = page.evaluate("Array.from(document.querySelectorAll('figure.heatmap'), "
                          "f => f.dataset.layer + '/' + f.dataset.head + '/' + f.querySelector('img').naturalWidth)")
    assert sorted(s.rsplit("/", 1)[0] for s in shown) == [f"{i}/{h}" for i in range(2) for h in range(4)]
    assert all(int(s.rsplit("/", 1)[1]) > 100 for s in shown)  # decoded images, not broken links
    assert HOSTILE.replace(" ", "·") in page.text_content(".tokens")  # each byte a token, shown as text
    assert page.evaluate("window.__pwned") is None and page.get_attribute("html", "data-js-errors") is None
    assert errors == []
    assert page.locator("#architecture tbody tr").count() > 10


@pytest.mark.parametrize("argv,words", [
    (["inspect", "--model", "tiny", "--prompt", ""], "the prompt is empty"),
    (["inspect", "--model", "tiny", "--prompt", "x" * 200], "the prompt is 200 tokens; at most 128"),
    (["inspect", "--prompt", "x"], "give exactly one of --model PRESET or --checkpoint DIR"),
    (["inspect", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
    (["inspect", "--model", "nope"], "unknown model preset 'nope'"),
])
def test_bench_inspect_bad_input_is_one_line_exit_2(argv, words, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "o"), "--frequency-bytes", "1000"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_the_dashboard_links_a_trained_runs_inspection(tmp_path):
    import json
    from pathlib import Path

    from fastapi.testclient import TestClient

    from bench.store import Store
    from reports.dashboard import create_app

    root = Path(__file__).resolve().parent
    fingerprint = json.loads((root / "fixtures" / "run_a.json").read_text())["fingerprint"]
    ckpt = tmp_path / "ckpt"
    store = Store(tmp_path / "bench.sqlite")
    run_id = store.create_training_run(fingerprint, dict(train=dict(steps=1)), str(ckpt))
    store.add_training_step(run_id, 1, dict(loss=5.0, lr=1e-3, tokens_per_s=900.0, step_s=0.1))
    store.finish_training_run(run_id, "finished")
    store.close()
    app = create_app(lambda: Store(tmp_path / "bench.sqlite", read_only=True))
    with TestClient(app) as client:
        page = client.get(f"/train/{run_id}").text
        assert "bench inspect --checkpoint" in page and 'id="train-inspect"' not in page
        assert client.get(f"/train/{run_id}/inspect").status_code == 404
        (ckpt / "inspect").mkdir(parents=True)
        (ckpt / "inspect" / "index.html").write_text("<!doctype html><title>inspection</title>")
        assert f'href="/train/{run_id}/inspect"' in client.get(f"/train/{run_id}").text
        assert client.get(f"/train/{run_id}/inspect").text.endswith("<title>inspection</title>")


