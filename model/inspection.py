"""``bench inspect``: what a model does with a prompt, and where its parameters are.

One forward pass over the prompt with ``return_attention=True`` (``model.gpt``: an explicit
option of the forward, nothing hooked in) gives, per layer, the attention weights the layer
applied and the residual stream entering it. From them and the weights this module gathers:

- per layer and head, the attention pattern over the prompt's tokens (labelled with their
  strings) and its entropy: the mean over query positions of -sum p log2 p, in bits (a query
  at position t can spread over t + 1 keys, at most log2(t + 1) bits; the mean of that bound
  is given beside it);
- the token embedding matrix projected on its first two principal components (PCA through
  the eigenvectors of the C x C covariance, exact and deterministic), with the most frequent
  tokens labelled: frequency is counted by tokenising a bounded sample of the corpus (the
  Python standard library unless ``--corpus`` says otherwise; ``model.corpus``), and the page
  says which sample;
- the architecture: every module that holds parameters, its parameter count and bytes (in the
  dtype the weights are held in), tied weights counted once;
- per layer, the L2 norm of the residual stream for each token (mean and max over tokens).

``reports.inspect`` renders it (HTML with the PNG figures embedded, and the PNG files).
"""

from __future__ import annotations

from collections import Counter

import torch

from model.errors import InputError

MAX_PROMPT_TOKENS = 128  # a heatmap stays legible up to about this many labelled tokens
N_LABELLED = 40  # tokens labelled in the embedding projection
FREQUENCY_BYTES = 300_000  # the corpus sample tokenised for token frequencies


class InspectError(InputError):
    """A prompt or model ``bench inspect`` cannot show."""


def token_label(tokenizer, token_id: int) -> str:
    """A token's string, whitespace made visible, or ``#id`` when it is not text alone (a partial
    UTF-8 byte, an id past the tokenizer)."""
    try:
        text = tokenizer.decode([token_id])
    except ValueError:
        return f"#{token_id}"
    if not text or "\ufffd" in text:
        return f"#{token_id}"
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def architecture(model: torch.nn.Module) -> list[dict]:
    """Every module holding parameters of its own: name, type, shapes, parameters and bytes. A tied
    parameter is counted where it first appears and noted where it appears again."""
    seen: dict[int, str] = {}
    rows = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False, remove_duplicate=False))
        if not own:
            continue
        params = nbytes = 0
        shapes, tied = [], []
        for pname, p in own:
            full = f"{name}.{pname}"
            shapes.append(f"{pname} {tuple(p.shape)}")
            if id(p) in seen:
                tied.append(f"{pname} is {seen[id(p)]}")
                continue
            seen[id(p)] = full
            params += p.numel()
            nbytes += p.numel() * p.element_size()
        rows.append(dict(name=name, type=type(module).__name__, shapes=", ".join(shapes), params=params,
                         bytes=nbytes, dtype=str(own[0][1].dtype).replace("torch.", ""), tied="; ".join(tied)))
    return rows


def token_frequencies(tokenizer, corpus: str | None = None, max_bytes: int = FREQUENCY_BYTES) -> tuple[Counter, str]:
    """Token counts over a bounded sample of the corpus's training split, and a line saying what was counted."""
    from model.corpus import load_corpus

    c = load_corpus(corpus, max_bytes=max_bytes)
    docs = c.documents("train") or list(c.texts)
    counts: Counter = Counter()
    encoded = tokenizer.encode_batch(docs) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, docs)
    for ids in encoded:
        counts.update(ids)
    what = "the Python standard library" if c.source == "stdlib" else c.root
    return counts, (f"token counts in {sum(len(d.encode()) for d in docs):,} bytes of {what} "
                    f"({len(docs)} documents of the corpus's training split, at most {max_bytes:,} bytes in all), "
                    f"tokenised by the model's tokenizer ({type(tokenizer).__name__})")


def pca_2d(weights: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Rows projected on the first two principal components, and the share of variance each explains."""
    x = weights.detach().double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    top = vectors[:, [-1, -2]]
    # A component's sign is arbitrary: make the largest coordinate positive, so reruns draw the same picture.
    coords = x @ top
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True))).squeeze(0)
    total = float(values.clamp(min=0).sum()) or 1.0
    return (coords * signs).float(), [float(values[-1]) / total, float(values[-2]) / total]


@torch.no_grad()
def inspect_model(model, tokenizer, prompt: str, *, corpus: str | None = None,
                  frequency_bytes: int = FREQUENCY_BYTES) -> dict:
    """Everything the inspection page shows, as plain data (lists, not tensors)."""
    config = model.config
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InspectError("the prompt is empty: give some text with --prompt")
    limit = min(MAX_PROMPT_TOKENS, config.block_size)
    if len(ids) > limit:
        raise InspectError(f"the prompt is {len(ids)} tokens; at most {limit} are shown (a heatmap per head stays "
                           "legible): shorten --prompt")
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        raise InspectError(f"the prompt holds token id {bad[0]}, outside the model's vocabulary [0, {config.vocab_size})")
    model.eval()
    logits, _, inside = model(torch.tensor([ids]), return_attention=True)
    attentions = [a[0].float() for a in inside["attentions"]]  # (H, T, T) per layer
    positions = torch.arange(1, len(ids) + 1, dtype=torch.float64)
    bound = float(torch.log2(positions).mean())  # the mean entropy of uniform attention over the visible keys
    entropy = []
    for a in attentions:
        p = a.double()
        h = -(p * torch.log2(p.clamp(min=1e-30))).sum(-1)  # (H, T): 0 * log 0 counts as 0
        entropy.append([float(x) for x in h.mean(-1)])
    norms = [h[0].float().norm(dim=-1) for h in inside["hidden"]]  # (T,) per residual stream
    counts, frequency_source = token_frequencies(tokenizer, corpus, frequency_bytes)
    coords, explained = pca_2d(model.transformer.wte.weight)
    frequent = [t for t, _ in counts.most_common() if t < config.vocab_size][:N_LABELLED]
    next_id = int(logits[0, -1].argmax())
    return dict(
        model=dict(family=config.family, n_layer=config.n_layer, n_head=config.n_head, n_kv_head=config.n_kv_head,
                   n_embd=config.n_embd, vocab_size=config.vocab_size, block_size=config.block_size,
                   n_params=config.n_params),
        prompt=prompt, token_ids=ids, tokens=[token_label(tokenizer, i) for i in ids],
        next_token=dict(id=next_id, label=token_label(tokenizer, next_id)),
        attentions=[a.tolist() for a in attentions],
        entropy_bits=entropy, entropy_uniform_bits=bound,
        norms=dict(labels=["embedding"] + [f"after block {i}" for i in range(config.n_layer)],
                   per_token=[n.tolist() for n in norms], mean=[float(n.mean()) for n in norms],
                   max=[float(n.max()) for n in norms]),
        embeddings=dict(coords=coords.tolist(), explained=explained,
                        labelled=[dict(id=t, label=token_label(tokenizer, t), count=counts[t]) for t in frequent],
                        frequency_source=frequency_source),
        architecture=architecture(model),
    )

