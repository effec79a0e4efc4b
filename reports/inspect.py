"""``bench inspect``'s page: one self-contained HTML file and the PNG figures it shows.

The figures are drawn with matplotlib (Agg, no display) and written as PNG files; the page
embeds the same PNGs as ``data:`` URIs, so the HTML alone opens offline and nothing comes from
a CDN. Matplotlib rather than screenshots of a browser: ``bench inspect`` then needs no browser
at run time (Playwright and chromium are test tools here), and a heatmap with a few hundred
labelled cells is exactly what ``imshow`` draws.

Every string from the prompt, the tokenizer or the model goes through ``html.escape``. The page
checks itself as the report does: script errors land in ``<html data-js-errors>``, and
``<body data-heatmaps>`` counts the heatmaps drawn.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

FIG_DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def heatmap_png(weights: list[list[float]], tokens: list[str], title: str) -> bytes:
    """One head's attention: queries down, keys across, each labelled with its token."""
    plt = _pyplot()
    n = len(tokens)
    side = min(9.0, 1.6 + 0.22 * n)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    size = max(4, min(9, 220 // max(n, 1)))
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=size)
    ax.set_yticks(range(n), tokens, fontsize=size)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return _png(fig)


def entropy_png(entropy: list[list[float]], uniform: float) -> bytes:
    plt = _pyplot()
    n_layer, n_head = len(entropy), len(entropy[0])
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * n_head, 1.2 + 0.4 * n_layer))
    image = ax.imshow(entropy, cmap="magma", vmin=0.0, vmax=max(uniform, 1e-9), aspect="auto")
    ax.set_xticks(range(n_head), [str(h) for h in range(n_head)])
    ax.set_yticks(range(n_layer), [str(i) for i in range(n_layer)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if n_layer * n_head <= 200:
        for i, row in enumerate(entropy):
            for h, v in enumerate(row):
                ax.text(h, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * uniform else "black")
    ax.set_title(f"attention entropy, bits (uniform over the visible keys: {uniform:.2f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="bits")
    return _png(fig)


def embeddings_png(emb: dict) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    xs = [c[0] for c in emb["coords"]]
    ys = [c[1] for c in emb["coords"]]
    ax.scatter(xs, ys, s=3 if len(xs) < 5000 else 0.5, c="#9aa5b1", linewidths=0)
    for t in emb["labelled"]:
        x, y = emb["coords"][t["id"]]
        ax.scatter([x], [y], s=12, c="#e15759")
        ax.annotate(t["label"], (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    e1, e2 = emb["explained"]
    ax.set_xlabel(f"PC 1 ({100 * e1:.1f}% of the variance)")
    ax.set_ylabel(f"PC 2 ({100 * e2:.1f}%)")
    ax.set_title(f"token embeddings ({len(xs)} rows), the {len(emb['labelled'])} most frequent tokens labelled",
                 fontsize=10)
    return _png(fig)


def norms_png(norms: dict, tokens: list[str]) -> bytes:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.35 * len(norms["labels"])),
                                      gridspec_kw=dict(width_ratios=[1, 2]))
    layers = range(len(norms["labels"]))
    left.plot(norms["mean"], layers, marker="o", label="mean over tokens")
    left.plot(norms["max"], layers, marker="x", label="max")
    left.set_yticks(list(layers), norms["labels"], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("L2 norm of the residual stream")
    left.legend(fontsize=8)
    image = right.imshow(norms["per_token"], aspect="auto", cmap="viridis")
    right.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=max(4, min(8, 220 // max(len(tokens), 1))))
    right.set_yticks(list(layers), norms["labels"], fontsize=8)
    fig.colorbar(image, ax=right, label="L2 norm")
    fig.suptitle("activation norms per layer", fontsize=10)
    return _png(fig)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def write(result: dict, out_dir: str | Path, title: str) -> Path:
    """The PNG files and ``index.html`` under ``out_dir``; the page's path."""
    out = Path(out_dir)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    tokens = result["tokens"]
    figures: dict[str, bytes] = {}
    for i, layer in enumerate(result["attentions"]):
        for h, weights in enumerate(layer):
            figures[f"heads/layer{i}-head{h}.png"] = heatmap_png(
                weights, tokens, f"layer {i} · head {h} · entropy {result['entropy_bits'][i][h]:.2f} bits")
    figures["entropy.png"] = entropy_png(result["entropy_bits"], result["entropy_uniform_bits"])
    figures["embeddings-pca.png"] = embeddings_png(result["embeddings"])
    figures["activation-norms.png"] = norms_png(result["norms"], tokens)
    for name, data in figures.items():
        (out / name).write_bytes(data)
    page = out / "index.html"
    page.write_text(render(result, title, figures), encoding="utf-8")
    return page


def _img(figures: dict[str, bytes], name: str, alt: str, cls: str = "", extra: str = "") -> str:
    data = base64.b64encode(figures[name]).decode()
    return (f'<img class="{cls}" src="data:image/png;base64,{data}" alt="{escape(alt, quote=True)}" '
            f'title="{escape(name, quote=True)}"{extra}>')


CSS = """
body { font: 14px/1.5 system-ui, sans-serif; margin: 0; color: #1f2328; }
header { background: #24292f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; } header p { margin: 0; color: #c9d1d9; }
main { max-width: 1340px; margin: 0 auto; padding: 8px 32px 48px; }
h2 { font-size: 19px; border-bottom: 1px solid #d8dee4; padding-bottom: 4px; margin-top: 32px; }
.tokens span { display: inline-block; border: 1px solid #d8dee4; border-radius: 3px; padding: 0 4px; margin: 2px;
               font-family: ui-monospace, monospace; font-size: 12px; }
.heads { display: flex; flex-wrap: wrap; gap: 12px; }
figure.heatmap { margin: 0; } figure.heatmap img { max-width: 420px; }
img { max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; } td, th { border-bottom: 1px solid #eaeef2; padding: 3px 8px; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: 600; border-top: 2px solid #d8dee4; }
p.note { color: #656d76; }
"""


def render(result: dict, title: str, figures: dict[str, bytes]) -> str:
    m = result["model"]
    shape = (f"{m['family']} · {m['n_layer']} layers · {m['n_head']} heads"
             + (f" ({m['n_kv_head']} kv)" if m["n_kv_head"] != m["n_head"] else "")
             + f" · {m['n_embd']} wide · vocabulary {m['vocab_size']} · {m['n_params']:,} parameters")
    tokens = "".join(f'<span title="id {i}">{escape(t)}</span>' for t, i in zip(result["tokens"], result["token_ids"]))
    layers = []
    for i, layer in enumerate(result["attentions"]):
        heads = "".join(
            f'<figure class="heatmap" data-layer="{i}" data-head="{h}">'
            + _img(figures, f"heads/layer{i}-head{h}.png", f"attention of layer {i}, head {h}")
            + f"<figcaption>layer {i} · head {h} · {result['entropy_bits'][i][h]:.2f} bits</figcaption></figure>"
            for h in range(len(layer)))
        layers.append(f'<h3>Layer {i}</h3><div class="heads">{heads}</div>')
    rows, total_params, total_bytes = [], 0, 0
    for r in result["architecture"]:
        total_params += r["params"]
        total_bytes += r["bytes"]
        tied = f" (tied: {escape(r['tied'])})" if r["tied"] else ""
        rows.append(f"<tr><td>{escape(r['name'])}</td><td>{escape(r['type'])}</td><td>{escape(r['shapes'])}{tied}</td>"
                    f"<td>{escape(r['dtype'])}</td><td class=\"num\">{r['params']:,}</td>"
                    f"<td class=\"num\">{human_bytes(r['bytes'])}</td></tr>")
    rows.append(f'<tr class="total"><td colspan="4">total</td><td class="num">{total_params:,}</td>'
                f'<td class="num">{human_bytes(total_bytes)}</td></tr>')
    labelled = ", ".join(f"{escape(t['label'])} ({t['count']:,})" for t in result["embeddings"]["labelled"])
    norms = "".join(f"<tr><td>{escape(label)}</td><td class=\"num\">{mean:.3f}</td><td class=\"num\">{mx:.3f}</td></tr>"
                    for label, mean, mx in zip(result["norms"]["labels"], result["norms"]["mean"], result["norms"]["max"]))
    n_heads = sum(len(layer) for layer in result["attentions"])
    return f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{escape(title)} · inspection</title><link rel="icon" href="data:,">
<script>window.addEventListener("error", function (e) {{
  document.documentElement.setAttribute("data-js-errors", String(e.message)); }});</script>
<style>{CSS}</style></head>
<body data-heatmaps-expected="{n_heads}">
<header><h1>{escape(title)}</h1><p>{escape(shape)}</p></header>
<main>
<h2>The prompt</h2>
<p class="tokens">{tokens}</p>
<p class="note">{len(result["tokens"])} tokens (whitespace shown as · and \\n; #id: a token that is not text on its own).
The model's next token: <code>{escape(result["next_token"]["label"])}</code>.</p>
<h2>Attention, per layer and head</h2>
<p class="note">Each row is a query position, each column a key; a row sums to 1. These are the weights the layer
applied (an explicit option of the model's forward, checked against its own attention in the tests).</p>
{"".join(layers)}
<h2>Attention entropy per head</h2>
{_img(figures, "entropy.png", "attention entropy per layer and head")}
<p class="note">The mean over query positions of the entropy of a row, in bits. Low: the head looks at few
positions; {result["entropy_uniform_bits"]:.2f} bits: it spreads evenly over all it may see.</p>
<h2>Token embeddings, PCA</h2>
{_img(figures, "embeddings-pca.png", "token embeddings projected on two principal components")}
<p class="note">Labelled: the most frequent tokens by {escape(result["embeddings"]["frequency_source"])}:
{labelled}.</p>
<h2>Activation norms per layer</h2>
{_img(figures, "activation-norms.png", "activation norms per layer")}
<table><thead><tr><th>residual stream</th><th class="num">mean L2 norm</th><th class="num">max</th></tr></thead>
<tbody>{norms}</tbody></table>
<h2>Architecture</h2>
<table id="architecture"><thead><tr><th>module</th><th>type</th><th>parameters (shape)</th><th>dtype</th>
<th class="num">parameters</th><th class="num">bytes</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
</main>
<script>document.body.setAttribute("data-heatmaps",
  String(document.querySelectorAll("figure.heatmap img").length));</script>
</body>
</html>
"""
