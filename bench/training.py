"""``bench train``: train a preset on a corpus, with its metrics in the result store.

The training loop itself is ``model.train`` (it knows nothing of the store); this module
gathers the corpus, skips the work when the same corpus, configs and seed were already
trained into the output directory, and logs every step into the SQLite store as a training
run, so reports can draw the loss curve beside the benchmark results.

Fine-tuning (``bench train --from CKPT``) starts from a checkpoint's weights and tokenizer
(``FineTuneStart``): all of them train, or with ``--lora-rank`` only LoRA adapters
(``model.lora``) on a frozen base, which ``--base-precision int8|int4`` holds quantised
(QLoRA-style, ``backends.int8.FrozenQuantLinear``: this is why the start is made here, where
``backends`` may be imported, and not in ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BASE_PRECISIONS = ("fp32", "int8", "int4")


@dataclass
class FineTuneStart:
    """What a fine-tuning run starts from; called (in every worker) to make the model.

    ``source``: a local checkpoint directory (ours or Hugging Face's; an ``s3://`` one is fetched
    by the CLI first). ``lora``: None trains every weight. ``base_precision``: the frozen base's
    (int8 or int4 needs LoRA: a quantised weight cannot train)."""

    source: str
    lora: object = None  # model.lora.LoRAConfig
    base_precision: str = "fp32"
    seed: int = 0
    digest: str = ""  # model_fingerprint of the fp32 base
    tokenizer: object = field(default=None, repr=False)
    config: object = field(default=None, repr=False)  # the base's GPTConfig

    @classmethod
    def open(cls, source: str, lora=None, base_precision: str = "fp32", seed: int = 0) -> FineTuneStart:
        """Read the checkpoint's config, digest and tokenizer; every refusal before training."""
        from model.checkpoint import load_checkpoint
        from model.errors import InputError
        from model.gpt import model_fingerprint
        from model.tokenizer import HFTokenizer, load_tokenizer

        if base_precision not in BASE_PRECISIONS:
            raise InputError(f"base precision {base_precision!r} is not one of {', '.join(BASE_PRECISIONS)}")
        if base_precision != "fp32" and lora is None:
            raise InputError(f"--base-precision {base_precision} needs --lora-rank: a quantised base is frozen, "
                             f"only adapters on it can train")
        model = load_checkpoint(source)
        tokenizer = load_tokenizer(source, model.config.vocab_size)
        if not isinstance(tokenizer, HFTokenizer):
            raise InputError(f"{source}: holds no tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                             f"fine-tuning needs the checkpoint's own")
        source = str(source) if str(source).startswith("s3://") else str(Path(source).resolve())
        return cls(str(source), lora, base_precision, seed, model_fingerprint(model), tokenizer, model.config)

    @property
    def info(self) -> dict:
        """What the run's key and run.json record of the start."""
        return dict(source=self.source, digest=self.digest, base_precision=self.base_precision,
                    lora=None if self.lora is None else self.lora.to_dict())

    def __call__(self):
        from backends.int8 import quantize_frozen_base
        from model.checkpoint import load_checkpoint
        from model.lora import apply_lora, target_names

        model = load_checkpoint(self.source)
        for p in model.parameters():
            p.requires_grad_(True)
        if self.lora is None:
            return model
        if self.base_precision != "fp32":
            every = type(self.lora)()  # all four kinds of block Linear: the whole base is quantised
            quantize_frozen_base(model, self.base_precision, target_names(model, every))
        return apply_lora(model, self.lora, base_digest=self.digest, seed=self.seed,
                          base_precision=self.base_precision, source=self.source)


def train_preset(model_config, train_config, out_dir: str | Path, store, fingerprint: dict, *,
                 corpus_path: str | None = None, max_bytes: int | None = None, resume: bool = False,
                 name: str | None = None, on_step: Callable | None = None,
                 on_checkpoint: Callable | None = None, start: FineTuneStart | None = None,
                 workers: int = 1, launch: Callable | None = None) -> dict:
    """Train (or find already trained) ``model_config`` on the corpus; returns the summary dict.

    The summary has ``cached: True`` when the output directory already holds a finished run
    with the same key (``model.train.corpus_run_key``: corpus digest, both configs, seed,
    tokenizer recipe); nothing is trained or overwritten then.
    """
    from model.corpus import load_corpus
    from model.train import check_out_dir, corpus_run_key, finished_run, train_on_corpus

    corpus = load_corpus(corpus_path, max_bytes=max_bytes)
    key = corpus_run_key(model_config, train_config, corpus, None if start is None else start.info)
    done = finished_run(out_dir, key)
    if done is not None and not resume:
        return dict(done.get("summary") or {}, cached=True, key=key, out_dir=str(out_dir))
    check_out_dir(out_dir, model_config, train_config, resume)  # refused before anything is stored
    config = dict(model=model_config.to_dict(), train=train_config.to_dict(), corpus_digest=corpus.digest,
                  corpus_source=corpus.source, corpus_bytes=corpus.n_bytes(), key=key, workers=workers)
    if start is not None:
        config["start"] = start.info
    run_id = store.create_training_run(fingerprint, config, str(out_dir), name=name)

    def logged(progress):
        metrics = dict(loss=progress.loss, lr=progress.lr, grad_norm=progress.grad_norm,
                       tokens_per_s=progress.tokens_per_s, elapsed_s=progress.elapsed_s)
        if progress.val_loss is not None:
            metrics["val_loss"] = progress.val_loss
        store.add_training_step(run_id, progress.step, metrics)
        if on_step:
            on_step(progress)

    try:
        if workers > 1 and launch is None:
            from model.distributed import launch_local as launch
        summary = train_on_corpus(model_config, train_config, corpus, out_dir, resume=resume, on_step=logged,
                                  on_checkpoint=on_checkpoint, start=start, workers=workers, launch=launch)
    except KeyboardInterrupt:
        store.finish_training_run(run_id, "interrupted")
        raise
    except BaseException:
        store.finish_training_run(run_id, "failed")
        raise
    result = dict(summary.to_dict(), cached=False, run_id=run_id)
    store.finish_training_run(run_id, "finished", result)
    return result


# -- bench train --out s3://bucket/prefix --------------------------------------------------

def remote_staging_dir(uri: str) -> Path:
    """Where ``bench train --out s3://...`` trains before uploading: one local directory per URI
    (under the cache), so ``--resume`` and the finished-run check find the same run again."""
    import hashlib

    from model.storage import cache_root, split_uri

    bucket, prefix = split_uri(uri)
    digest = hashlib.sha256(f"s3://{bucket}/{prefix}".encode()).hexdigest()[:16]
    return cache_root() / "staging" / digest / (prefix.rsplit("/", 1)[-1] or bucket)


class RunUploader:
    """Mirrors a training run's directory into ``s3://bucket/prefix`` as it is written.

    Called with each checkpoint directory (``step-*``, ``best``) by the training loop's
    ``on_checkpoint``, it uploads it to the same name under the prefix, then deletes the step
    checkpoints the loop has pruned locally (``keep_last``). ``finish`` uploads the run's top
    (the final weights, ``run.json``, ``metrics.jsonl``) and anything not yet there; an
    unchanged checkpoint (same manifest) is not sent again.
    """

    def __init__(self, out_dir: str | Path, uri: str, announce: Callable[[str], None] | None = None):
        from model.storage import split_uri

        bucket, prefix = split_uri(uri)
        self.out_dir, self.uri, self.announce = Path(out_dir), f"s3://{bucket}/{prefix}", announce
        self.uploaded: list[str] = []

    def __call__(self, path: Path) -> None:
        self._upload(Path(path))
        self._prune()

    def finish(self) -> list[str]:
        for d in sorted(self.out_dir.glob("step-*")) + [self.out_dir / "best"]:
            if d.is_dir():
                self._upload(d)
        self._upload(self.out_dir)
        self._prune()
        return self.uploaded

    def _upload(self, path: Path) -> None:
        from model.storage import upload_checkpoint

        rel = path.relative_to(self.out_dir).as_posix()
        uri = self.uri if rel == "." else f"{self.uri}/{rel}"
        if upload_checkpoint(path, uri):
            self.uploaded.append(uri)
            if self.announce:
                self.announce(f"uploaded {uri}")

    def _prune(self) -> None:
        from model.storage import delete_checkpoint, list_checkpoints

        for name in list_checkpoints(self.uri):
            if name.startswith("step-") and not (self.out_dir / name).is_dir():
                delete_checkpoint(f"{self.uri}/{name}")


def remote_uploader(out: str, announce: Callable[[str], None] | None = None) -> tuple[Path | str, RunUploader | None]:
    """(where to train, uploader) for ``bench train --out``: a local directory as it is, no uploader;
    an ``s3://`` prefix: its local staging directory and a ``RunUploader`` into it. A prefix that
    already holds objects with no run of it staged here is refused before anything is written."""
    from model.errors import InputError
    from model.storage import check_access, is_remote

    if not is_remote(out):
        return out, None
    out_dir = remote_staging_dir(out)
    if check_access(out) and not out_dir.is_dir():
        raise InputError(f"bench train: {out} already holds objects and no run of it is staged on this "
                         f"machine ({out_dir}); nothing was written: choose another prefix")
    return out_dir, RunUploader(out_dir, out, announce=announce)
