"""Text to train and evaluate on, with no download: by default, the Python standard library.

Every Python installation ships its standard library as ``.py`` sources, so the default
corpus is already on disk. It is gathered deterministically (sorted relative paths under
``sysconfig``'s ``stdlib`` directory) and split into train / validation / test by a hash
of each file's relative path, so a file's split never depends on which other files exist.

What is left out of the standard library, and why:
    site-packages   third-party code, different on every machine
    test, tests, idle_test   the regression suites: 60% of the bytes, full of deliberately
                    odd files (bad encodings, syntax errors), and the most version-specific
    files that are not valid UTF-8 (counted as skipped in the manifest)

``--corpus PATH`` takes the user's own text instead: a directory is gathered and split the
same way (every non-hidden file that is UTF-8 text); a single file is cut at line
boundaries into consecutive train / validation / test pieces, as nanoGPT splits its
Shakespeare, since one file cannot be split by path.

The manifest lists every file (relative path, split, bytes, SHA-256) and digests of the
whole corpus and of each split, so two machines with different Python versions are seen to
have different test sets.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from model.errors import InputError

SPLITS = ("train", "val", "test")
FRACTIONS = (0.90, 0.05, 0.05)  # train, val, test
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MANIFEST_FORMAT = "llm-backend-bench/corpus"


class CorpusError(InputError):
    """The corpus cannot be used: missing, empty, or unreadable. The message names the path."""


@dataclass(frozen=True)
class CorpusFile:
    """One document: its path relative to the corpus root (a piece of a single file is
    named ``file.txt[start:end]`` by byte offsets), its split, size and SHA-256."""

    path: str
    split: str
    n_bytes: int
    sha256: str


@dataclass(frozen=True)
class Corpus:
    """The documents of a corpus, in a fixed order, with their split."""

    source: str  # "stdlib", "dir" or "file"
    root: str
    files: tuple[CorpusFile, ...]
    texts: tuple[str, ...]  # parallel to ``files``
    skipped: int = 0  # files left out as not UTF-8 text
    max_bytes: int | None = None

    def documents(self, split: str) -> list[str]:
        """The texts of one split, in corpus order."""
        _check_split(split)
        return [t for f, t in zip(self.files, self.texts) if f.split == split]

    def n_bytes(self, split: str | None = None) -> int:
        """UTF-8 bytes of one split, or of the whole corpus."""
        return sum(f.n_bytes for f in self.files if split is None or f.split == split)

    @property
    def digest(self) -> str:
        """SHA-256 over every file's path, split and content hash: the corpus's identity."""
        return _digest(self.files)

    def split_digest(self, split: str) -> str:
        _check_split(split)
        return _digest(f for f in self.files if f.split == split)

    def manifest(self) -> dict:
        """Plain data for JSON: the source, digests, per-split totals and every file."""
        return dict(
            format=MANIFEST_FORMAT, source=self.source, root=self.root, max_bytes=self.max_bytes,
            digest=self.digest, skipped=self.skipped,
            splits={s: dict(n_files=sum(f.split == s for f in self.files), n_bytes=self.n_bytes(s),
                            digest=self.split_digest(s)) for s in SPLITS},
            files=[dict(path=f.path, split=f.split, n_bytes=f.n_bytes, sha256=f.sha256) for f in self.files],
        )

    def write_manifest(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.manifest(), indent=1) + "\n")
        return path


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str, fractions: tuple[float, float, float] = FRACTIONS) -> str:
    """The split of a document, from a hash of its relative path alone.

    The first 8 bytes of SHA-256 as a number in [0, 1): below the train fraction is train,
    then validation, then test. Adding or removing other files never moves this one.
    """
    u = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def load_corpus(path: str | Path | None = None, max_bytes: int | None = None,
                fractions: tuple[float, float, float] = FRACTIONS) -> Corpus:
    """The standard library (``path=None``), or the user's text file or directory.

    max_bytes: keep at most this many bytes, so training on a small machine stays short.
        Each split gets its fraction of the budget, filled with documents taken in a fixed
        pseudo-random order (a hash of the path), so a bounded corpus still spans the whole
        library rather than its first modules, and each kept file keeps its split. A single
        file is cut to its first ``max_bytes``.
    Raises ``CorpusError`` naming the path when it is missing or holds no text.
    """
    _check_fractions(fractions)
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise CorpusError(f"max_bytes={max_bytes!r} must be a positive integer")
    if path is None:
        root = stdlib_root()
        candidates = [p for p in sorted(root.rglob("*.py"))
                      if not STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
        return _from_files("stdlib", root, candidates, max_bytes, fractions)
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"{root}: corpus path does not exist")
    if root.is_file():
        return _from_single_file(root, max_bytes, fractions)
    candidates = [p for p in sorted(root.rglob("*"))
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return _from_files("dir", root, candidates, max_bytes, fractions)


def _from_files(source: str, root: Path, paths: list[Path], max_bytes: int | None,
                fractions: tuple[float, float, float]) -> Corpus:
    rel = {p: p.relative_to(root).as_posix() for p in paths}
    # A bounded corpus takes documents in an order of their own hash (salted, so it is not
    # the split's hash), each split up to its fraction of the budget.
    order = sorted(paths, key=lambda p: hashlib.sha256(b"order\0" + rel[p].encode()).digest()) if max_bytes else paths
    budget = {s: (max_bytes or 0) * f for s, f in zip(SPLITS, fractions)}
    kept: dict[Path, tuple[CorpusFile, str]] = {}
    skipped = 0
    for p in order:
        data = p.read_bytes()
        text = _utf8_text(data)
        if text is None:
            skipped += 1
            continue
        if not data:
            continue
        split = split_of(rel[p], fractions)
        if max_bytes is not None:
            if len(data) > budget[split]:
                continue  # a smaller file later in the order may still fit
            budget[split] -= len(data)
        kept[p] = (CorpusFile(rel[p], split, len(data), hashlib.sha256(data).hexdigest()), text)
    if not kept:
        what = "no non-empty UTF-8 text files" if max_bytes is None else f"no text file within max_bytes={max_bytes}"
        raise CorpusError(f"{root}: corpus is empty ({what})")
    files = [kept[p] for p in paths if p in kept]  # back to sorted-path order
    return Corpus(source, str(root), tuple(f for f, _ in files), tuple(t for _, t in files), skipped, max_bytes)


def _from_single_file(path: Path, max_bytes: int | None, fractions: tuple[float, float, float]) -> Corpus:
    data = path.read_bytes()
    if _utf8_text(data) is None:
        raise CorpusError(f"{path}: corpus file is not UTF-8 text")
    if max_bytes is not None and len(data) > max_bytes:
        data = data[:max_bytes]
        while data and _utf8_text(data) is None:  # never cut a character in half
            data = data[:-1]
    if not data.strip():
        raise CorpusError(f"{path}: corpus file is empty")
    # Cut at line boundaries into consecutive pieces: train, then validation, then test.
    cuts, start = [], 0
    for fraction in (fractions[0], fractions[0] + fractions[1]):
        at = data.find(b"\n", int(len(data) * fraction))
        at = len(data) if at < 0 else at + 1
        cuts.append(max(at, start))
        start = cuts[-1]
    bounds = [0, *cuts, len(data)]
    files, texts = [], []
    for split, a, b in zip(SPLITS, bounds, bounds[1:]):
        piece = data[a:b]
        files.append(CorpusFile(f"{path.name}[{a}:{b}]", split, len(piece), hashlib.sha256(piece).hexdigest()))
        texts.append(piece.decode("utf-8"))
    return Corpus("file", str(path), tuple(files), tuple(texts), 0, max_bytes)


def _utf8_text(data: bytes) -> str | None:
    """The text, or None for bytes that are not UTF-8 text (a NUL byte means binary)."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _digest(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.split}\0{f.sha256}\n".encode())
    return h.hexdigest()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")


def _check_fractions(fractions) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9 or fractions[0] <= 0:
        raise ValueError(f"fractions={fractions!r} must be three non-negative numbers summing to 1, train > 0")
