"""Quality per backend and precision: perplexity, and how far a backend's distribution moves.

Perplexity follows Hugging Face's guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity): windows of ``context`` tokens that
start every ``stride`` tokens, where each token is scored at most once, by the first window
that reaches it; with ``stride < context`` the tokens a window shares with the one before are
context only, and a stream of N tokens scores N - 1 (its first token has nothing before it).
With ``stride == context`` the windows do not overlap and, as in the guide, the first token
of every window has no context and is not scored. The result carries ``n_tokens`` and ``nll_sum`` (natural
log), so anyone can recompute ``perplexity = exp(nll_sum / n_tokens)`` with another tool,
and bits per byte, ``nll_sum / (ln 2 * n_bytes)``, which does not depend on the tokenizer.

``compare`` runs a backend and a reference (eager fp32) on the same windows and reports what
llama.cpp's ``llama-perplexity --kl-divergence`` reports
(https://github.com/ggml-org/llama.cpp/tree/master/tools/perplexity), with its standard
errors: the PPL ratio, the mean KL divergence and its 99th percentile, the share of tokens
whose most likely next token is the same, and the RMS change in the correct token's
probability. As there, a standard error treats scored tokens as independent samples;
tokens of one window are correlated, so read them as a lower bound on the uncertainty.

Backends are driven through ``Backend.logits`` (every position's logits); a plain
``GPT`` module or any function ``ids (B, T) -> logits (B, T, vocab)`` works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

from model.errors import InputError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# The verdict's tolerances, with where they come from.
# Intel Neural Compressor's default accuracy criterion: AccuracyCriterion(higher_is_better=True,
# criterion="relative", tolerable_loss=0.01), a relative loss of 1%
# (https://intel.github.io/neural-compressor/latest/autoapi/neural_compressor/config/index.html).
RELATIVE_TOLERANCE = 0.01
# NNCF's quantize_with_accuracy_control(max_drop=0.01, drop_type=DropType.ABSOLUTE) by default
# (nncf 3.4 signature; https://docs.openvino.ai/2025/openvino-workflow/model-optimization-guide/
# quantizing-models-post-training/quantizing-with-accuracy-control.html): an absolute drop of
# 0.01 in a metric on [0, 1], applied here to next-token top-1 accuracy.
ABSOLUTE_ACCURACY_DROP = 0.01


@dataclass(frozen=True)
class Window:
    begin: int  # first input token
    end: int  # one past the last input token
    first_target: int  # the first token this window scores; it scores first_target .. end - 1


def windows(n_tokens: int, context: int, stride: int | None = None) -> list[Window]:
    """The windows that score every token of an ``n_tokens`` stream once (HF's sliding window)."""
    stride = context if stride is None else stride
    if context < 2:
        raise QualityInputError(f"context={context} must be at least 2")
    if not 1 <= stride <= context:
        raise QualityInputError(f"stride={stride} must be in [1, context={context}]")
    if n_tokens < 2:
        raise ValueError(f"a stream of {n_tokens} tokens has nothing to score (needs at least 2)")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(runner, token_ids, context: int, stride: int | None = None, n_bytes: int | None = None,
               batch_size: int = 8) -> dict:
    """Perplexity of ``runner`` on one token stream, each token scored once.

    runner: a loaded ``Backend`` (its ``logits`` verb), a ``GPT``, or ``ids -> logits``.
    n_bytes: UTF-8 bytes of the text the stream encodes, for bits per byte.
    Returns n_tokens, nll_sum, nll_mean (with its standard error), perplexity, bits_per_byte
    (None without ``n_bytes``), top-1 accuracy of the next token, and the window settings.
    """
    logits_fn = as_logits_fn(runner)
    nll, correct = [], []
    for targets, (logp,) in _scored(token_ids, context, stride, batch_size, logits_fn):
        nll.append(-logp.gather(1, targets[:, None])[:, 0].double())
        correct.append(logp.argmax(1) == targets)
    return _summary(torch.cat(nll).numpy(), torch.cat(correct).numpy(), context, stride, n_bytes)


def compare(reference, candidate, token_ids, context: int, stride: int | None = None,
            n_bytes: int | None = None, batch_size: int = 8) -> dict:
    """``candidate`` against ``reference`` (eager fp32) on the same windows, as llama.cpp's
    ``--kl-divergence`` does: per scored token, KL(reference || candidate) over the whole
    vocabulary, the two models' losses on the true token, and whether their top tokens agree.

    Returns ``reference`` and ``candidate`` (``perplexity``'s dict for each) and:
      ppl_ratio, ppl_ratio_se        PPL(candidate) / PPL(reference) = exp(mean of the per-token
                                     loss difference); its error by the delta method
      ln_ppl_ratio, ln_ppl_ratio_se  that mean difference and its standard error
      kl_mean, kl_mean_se, kl_median, kl_p99, kl_p999, kl_max
      same_top, same_top_se          share of tokens whose argmax agrees (0..1)
      dp_mean, dp_mean_se            mean change in the correct token's probability (candidate - reference)
      dp_rms, dp_rms_se              its root mean square
      accuracy_drop, accuracy_drop_se  reference top-1 accuracy minus the candidate's (paired)
    """
    ref_fn, cand_fn = as_logits_fn(reference), as_logits_fn(candidate)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in
                                            ("nll_ref", "nll_cand", "kl", "same", "dp", "ok_ref", "ok_cand")}
    for targets, (lp_ref, lp_cand) in _scored(token_ids, context, stride, batch_size, ref_fn, cand_fn):
        lp_ref, lp_cand = lp_ref.double(), lp_cand.double()
        p_ref = lp_ref.exp()
        t = targets[:, None]
        parts["nll_ref"].append(-lp_ref.gather(1, t)[:, 0])
        parts["nll_cand"].append(-lp_cand.gather(1, t)[:, 0])
        parts["kl"].append((p_ref * (lp_ref - lp_cand)).sum(1))
        top_ref, top_cand = lp_ref.argmax(1), lp_cand.argmax(1)
        parts["same"].append(top_ref == top_cand)
        parts["dp"].append(lp_cand.gather(1, t)[:, 0].exp() - p_ref.gather(1, t)[:, 0])
        parts["ok_ref"].append(top_ref == targets)
        parts["ok_cand"].append(top_cand == targets)
    a = {k: torch.cat(v).numpy() for k, v in parts.items()}
    n = len(a["kl"])

    diff = a["nll_cand"] - a["nll_ref"]
    ln_ratio, ln_ratio_se = _mean_se(diff)
    kl_mean, kl_se = _mean_se(a["kl"])
    same = float(a["same"].mean())
    dp_mean, dp_se = _mean_se(a["dp"])
    dp2_mean, dp2_se = _mean_se(a["dp"] ** 2)
    dp_rms = math.sqrt(dp2_mean)
    acc_drop, acc_drop_se = _mean_se(a["ok_ref"].astype(np.float64) - a["ok_cand"].astype(np.float64))
    return dict(
        reference=_summary(a["nll_ref"], a["ok_ref"], context, stride, n_bytes),
        candidate=_summary(a["nll_cand"], a["ok_cand"], context, stride, n_bytes),
        n_tokens=n,
        ln_ppl_ratio=ln_ratio, ln_ppl_ratio_se=ln_ratio_se,
        ppl_ratio=math.exp(ln_ratio), ppl_ratio_se=math.exp(ln_ratio) * ln_ratio_se,
        kl_mean=kl_mean, kl_mean_se=kl_se,
        kl_median=float(np.quantile(a["kl"], 0.5)), kl_p99=float(np.quantile(a["kl"], 0.99)),
        kl_p999=float(np.quantile(a["kl"], 0.999)), kl_max=float(a["kl"].max()),
        same_top=same, same_top_se=math.sqrt(same * (1 - same) / max(1, n - 1)),
        dp_mean=dp_mean, dp_mean_se=dp_se,
        dp_rms=dp_rms, dp_rms_se=dp2_se / (2 * dp_rms) if dp_rms > 0 else 0.0,
        accuracy_drop=acc_drop, accuracy_drop_se=acc_drop_se,
    )


def verdict(comparison: dict, relative_tolerance: float = RELATIVE_TOLERANCE,
            accuracy_drop: float = ABSOLUTE_ACCURACY_DROP, confidence: float = 0.95) -> dict:
    """Whether a backend keeps the reference's quality, with the criteria's sources.

    Two criteria, each judged on a two-sided ``confidence`` interval:
      perplexity  PPL ratio - 1 at most ``relative_tolerance``: Intel Neural Compressor's
                  default ``AccuracyCriterion(criterion="relative", tolerable_loss=0.01)``
                  applied to perplexity (lower is better, so a rise is the loss);
      accuracy    drop in next-token top-1 accuracy at most ``accuracy_drop``: NNCF's
                  ``quantize_with_accuracy_control(max_drop=0.01)``, whose default drop
                  type is absolute, on a metric in [0, 1].
    Each is "pass" when the whole interval is within tolerance, "fail" when the whole
    interval is beyond it, and "inconclusive" otherwise (score more tokens). The overall
    verdict is "fail" if either fails, "pass" if both pass, else "inconclusive".
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rel = comparison["ppl_ratio"] - 1
    rel_se = comparison["ppl_ratio_se"]
    drop, drop_se = comparison["accuracy_drop"], comparison["accuracy_drop_se"]
    checks = dict(
        perplexity=dict(value=rel, low=rel - z * rel_se, high=rel + z * rel_se, tolerance=relative_tolerance,
                        source="Intel Neural Compressor AccuracyCriterion default: relative, tolerable_loss=0.01"),
        accuracy=dict(value=drop, low=drop - z * drop_se, high=drop + z * drop_se, tolerance=accuracy_drop,
                      source="NNCF quantize_with_accuracy_control default: max_drop=0.01, DropType.ABSOLUTE"),
    )
    for check in checks.values():
        check["verdict"] = ("pass" if check["high"] <= check["tolerance"]
                            else "fail" if check["low"] > check["tolerance"] else "inconclusive")
    verdicts = {c["verdict"] for c in checks.values()}
    overall = "fail" if "fail" in verdicts else "pass" if verdicts == {"pass"} else "inconclusive"
    return dict(verdict=overall, confidence=confidence, checks=checks)


def unigram_perplexity(train_ids, test_ids, vocab_size: int, n_bytes: int | None = None) -> dict:
    """The baseline a language model must beat: each token's frequency in the training
    stream, with add-one (Laplace) smoothing over ``vocab_size``, scored on the test stream.

    It scores the same tokens as ``perplexity`` (all but the first), so the two compare
    directly; ``bits_per_byte`` needs the test text's ``n_bytes``.
    """
    train = np.asarray(train_ids, dtype=np.int64)
    test = np.asarray(test_ids, dtype=np.int64)
    if len(test) < 2:
        raise ValueError(f"a test stream of {len(test)} tokens has nothing to score (needs at least 2)")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    if len(counts) > vocab_size:
        raise ValueError(f"the training stream has ids >= vocab_size={vocab_size}")
    logp = np.log(counts + 1) - math.log(len(train) + vocab_size)
    nll = -logp[test[1:]]
    most_common = int(counts.argmax())
    return _summary(nll, test[1:] == most_common, None, None, n_bytes)


def as_logits_fn(runner) -> LogitsFn:
    """``ids (B, T) -> logits (B, T, vocab)`` float32 for a Backend, a GPT module or a function."""
    if hasattr(runner, "logits") and callable(runner.logits):
        return runner.logits
    if isinstance(runner, torch.nn.Module):
        def module_logits(ids: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return runner(ids)[0].float()
        return module_logits
    if callable(runner):
        return runner
    raise TypeError(f"cannot get logits from {type(runner).__name__}: expected a Backend, a module or a function")


# -- internals -----------------------------------------------------------------------------

def _scored(token_ids, context: int, stride: int | None, batch_size: int, *logits_fns: LogitsFn):
    """Per batch of windows: (targets (N,), one (N, vocab) log-softmax per function), the
    scored positions only, in stream order. Windows of equal length are batched together."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    all_windows = windows(len(ids), context, stride)
    for i in range(0, len(all_windows), batch_size):
        group = all_windows[i:i + batch_size]
        # Only the last window may be shorter; it goes alone.
        for same_len in ([group] if len({w.end - w.begin for w in group}) == 1 else [[w] for w in group]):
            x = torch.stack([ids[w.begin:w.end] for w in same_len])  # (B, T)
            with torch.no_grad():
                outs = [fn(x) for fn in logits_fns]
            targets, logps = [], [[] for _ in outs]
            for b, w in enumerate(same_len):
                # Position j predicts token begin + j + 1; the scored tokens are first_target .. end - 1.
                rows = slice(w.first_target - w.begin - 1, w.end - w.begin - 1)
                targets.append(ids[w.first_target:w.end])
                for k, out in enumerate(outs):
                    logps[k].append(torch.log_softmax(out[b, rows].float(), dim=-1))
            yield torch.cat(targets), tuple(torch.cat(lp) for lp in logps)


def _summary(nll: np.ndarray, correct: np.ndarray, context: int | None, stride: int | None,
             n_bytes: int | None) -> dict:
    n = len(nll)
    nll_sum = float(np.sum(nll, dtype=np.float64))
    mean, se = _mean_se(nll)
    return dict(
        n_tokens=n, nll_sum=nll_sum, nll_mean=mean, nll_mean_se=se,
        perplexity=math.exp(mean), perplexity_se=math.exp(mean) * se,
        bits_per_byte=None if n_bytes is None else nll_sum / (math.log(2) * n_bytes), n_bytes=n_bytes,
        accuracy=float(np.mean(correct)), context=context,
        stride=(context if stride is None else stride) if context is not None else None,
    )


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, sqrt(var / (n - 1)) as llama.cpp computes it."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mean = float(x.mean())
    if n < 2:
        return mean, 0.0
    var = float(np.mean(x * x) - mean * mean)
    return mean, math.sqrt(max(var, 0.0) / (n - 1))


# -- a checkpoint's test stream, and quality per backend -------------------------------------------

DEFAULT_CONTEXT = 128
DEFAULT_STRIDE = 64


class QualityInputError(InputError):
    """Quality cannot be measured as asked (no tokenizer, no corpus); the message says why."""


def checkpoint_stream(checkpoint_dir, corpus_path=None, max_tokens: int | None = None) -> dict:
    """The tokens quality is measured on, with what they are.

    With ``corpus_path`` (a text file): its whole text, encoded by the checkpoint's tokenizer
    with no special tokens added. Otherwise the test split of the corpus the checkpoint was
    trained on (``run.json``: the standard library of this Python, or the user's corpus),
    documents separated by end-of-text. ``max_tokens`` keeps that many, in blocks spread over
    the stream (``spread_blocks``; the bytes for bits per byte are then those of the kept
    tokens' text). The result names the test
    set by its digest and this Python's version: two machines with different Pythons have
    different standard libraries, so different test sets, and say so.
    """
    import json
    import platform
    from pathlib import Path

    from model.checkpoint import read_config
    from model.tokenizer import HFTokenizer, encode_documents, load_tokenizer

    directory = Path(checkpoint_dir)
    config = read_config(directory)
    tokenizer = load_tokenizer(directory, config.vocab_size)
    if not isinstance(tokenizer, HFTokenizer):
        raise QualityInputError(f"{directory}: has no trained tokenizer (tokenizer.json), so its text cannot be "
                                f"scored; train one with `bench train`")
    if corpus_path is not None:
        path = Path(corpus_path)
        if not path.is_file():
            raise QualityInputError(f"--corpus {str(path)!r}: not a file")
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tokenizer.encode(text)
        info = dict(source=str(path), split="whole file")
    else:
        run_file = directory / "run.json"
        if not run_file.is_file():
            raise QualityInputError(f"{directory}: no run.json, so the corpus it was trained on is unknown; "
                                    f"give --corpus FILE")
        run = json.loads(run_file.read_text())
        from model.corpus import load_corpus

        source = None if run.get("corpus_source") == "stdlib" else run.get("corpus_root")
        corpus = load_corpus(source, max_bytes=run.get("corpus_max_bytes"))
        ids = encode_documents(tokenizer, corpus.documents("test")).tolist()
        info = dict(source=run.get("corpus_source"), split="test", test_digest=corpus.split_digest("test"),
                    same_corpus_as_training=corpus.digest == run.get("corpus_digest"))
        text = None
    if max_tokens is not None and len(ids) > max_tokens:
        ids = spread_blocks(ids, max_tokens)
        text = None
        info["sampled"] = f"{max_tokens} tokens in blocks of {BLOCK} spread evenly over the stream"
    specials = {getattr(tokenizer, n, None) for n in ("eos_token_id", "bos_token_id", "pad_token_id")}
    n_bytes = len((text if text is not None else tokenizer.decode([i for i in ids if i not in specials]))
                  .encode("utf-8"))
    if len(ids) < 2:
        raise QualityInputError(f"{info['source']}: {len(ids)} tokens, nothing to score")
    return dict(ids=ids, n_bytes=n_bytes, n_ids=len(ids), python=platform.python_version(), **info)


BLOCK = 1024


def spread_blocks(ids: list[int], n: int, block: int = BLOCK) -> list[int]:
    """``n`` tokens of ``ids`` as blocks of ``block`` consecutive tokens spread evenly over it,
    so a bounded evaluation samples the whole test set rather than its first document."""
    if n >= len(ids):
        return list(ids)
    k = max(1, n // block)
    size = n // k
    starts = [round(i * (len(ids) - size) / max(1, k - 1)) for i in range(k)] if k > 1 else [0]
    return [t for s in starts for t in ids[s:s + size]]


def backend_quality(backend, reference, stream: dict, context: int = DEFAULT_CONTEXT,
                    stride: int = DEFAULT_STRIDE, is_reference: bool = False) -> dict:
    """The ``quality`` field of a cell: the backend's perplexity on the stream and, against the
    reference (eager fp32 on the same weights), llama.cpp's divergence statistics and the verdict."""
    context = min(context, stream["n_ids"])
    stride = min(stride, context)
    meta = {k: v for k, v in stream.items() if k != "ids"}
    if is_reference:
        ppl = perplexity(backend, stream["ids"], context, stride, stream["n_bytes"])
        return dict(stream=meta, perplexity=ppl, reference=True, verdict=dict(verdict="reference"))
    cmp = compare(reference, backend, stream["ids"], context, stride, stream["n_bytes"])
    return dict(stream=meta, perplexity=cmp.pop("candidate"), reference_perplexity=cmp.pop("reference"),
                divergence=cmp, verdict=verdict(cmp))


INFO_KEYS = ("int8_scheme", "group_size", "group_sizes", "block_size", "block_sizes", "padded_matrices",
             "accuracy_level", "symmetric", "int4_mode", "ratio", "quantized_checkpoint")


def quality_sweep(checkpoint: str, backends: list[str], precisions: list[str], *, corpus: str | None = None,
                  max_tokens: int | None = None, context: int = 128, stride: int | None = None,
                  threads: int | None = None, options: dict[str, dict] | None = None, on_row=None) -> tuple[dict, list]:
    """``bench quality``: perplexity and divergence from eager fp32 for each (backend, precision)
    the planner gives (``bench.planner.plan_targets``; a quantised checkpoint on its own target
    only), on the same windows of one token stream. Returns (the stream's description, rows);
    a target that cannot run is a row with status ``skipped`` and the reason."""
    from backends import registry
    from bench.models import open_model, quantized_target, reference_model
    from bench.planner import plan_targets

    quantized = quantized_target(checkpoint)
    targets = plan_targets(backends, precisions, registry.probe_isolated, quantized=quantized,
                           defaults=lambda cls, isa: [cls.default_precision])
    stream = checkpoint_stream(checkpoint, corpus_path=corpus, max_tokens=max_tokens)
    reference = registry.create("eager")
    reference.load(reference_model(checkpoint, checkpoint=True))  # a quantised checkpoint's fp32 source
    rows = []
    try:
        for target in targets:
            row = dict(backend=target.backend, precision=target.precision)
            if target.reason:
                row.update(status="skipped", reason=target.reason)
            else:
                with registry.create(target.backend, precision=target.precision, threads=threads,
                                     **(options or {}).get(target.backend, {})) as backend:
                    backend.load(open_model(checkpoint, target.backend, target.precision, checkpoint=True))
                    row["backend_info"] = {k: v for k, v in backend.info().items() if k in INFO_KEYS}
                    is_ref = (target.backend, backend.precision, backend.device) == ("eager", "fp32", "cpu")
                    row.update(status="ok", quality=backend_quality(backend, reference, stream, context,
                                                                     stride or context, is_reference=is_ref))
            rows.append(row)
            if on_row:
                on_row(row)
    finally:
        reference.close()
    return {k: v for k, v in stream.items() if k != "ids"}, rows
