"""The docs document what the tool stores and every command, their links resolve, and the default sweep is valid."""

import argparse
import re
from pathlib import Path

import pytest

from bench.results.schema import CELL_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECORD_PAGE = DOCS / "methodology.md"  # holds the cell record's table


def test_docs_document_every_cell_field():
    page = RECORD_PAGE.read_text()
    missing = [f for f in CELL_FIELDS if f"| `{f}` |" not in page]
    assert not missing, f"{RECORD_PAGE.relative_to(ROOT)}'s cell-record table lacks {missing}"


def test_default_sweep_parses():
    from bench.planner import load_toml

    values = load_toml(ROOT / "sweeps" / "default.toml")
    # the first answer: every own backend at every precision on gpt2, then the peers; the finalists
    # on a Llama-family model and the two trained models
    assert (values["backend"], values["precision"], values["model"]) == ("ours", "fastest", ["gpt2"])
    assert values["confirm"] >= 1 and values["launches"] == 3
    assert [p.get("backend") for p in values["also"]] == ["peers", None, None]
    assert [p.get("after_screen", False) for p in values["also"]] == [False, True, True]  # the finalists
    assert values["also"][1]["batch"] == [4] and values["also"][2]["model"] == [
        "smollm2-135m", "runs/small-trained", "runs/llama-small-trained"]
    full = load_toml(ROOT / "sweeps" / "full.toml")
    assert full["backend"] == "all" and full["launches"] == 3 and "confirm" not in full


@pytest.mark.parametrize("name, family", [("small", "gpt2"), ("llama-small", "llama")])
def test_make_bench_trains_a_valid_config(name, family):
    import tomllib

    from model.gpt import get_config
    from model.train import TrainConfig

    values = dict(tomllib.loads((ROOT / "sweeps" / f"train-{name}.toml").read_text())["train"])
    assert get_config(values.pop("model")).family == family
    assert TrainConfig.from_dict(values).steps > 0
    assert f"runs/{name}-trained" in (ROOT / "sweeps" / "default.toml").read_text()
    make = (ROOT / "Makefile").read_text()
    assert f"--config sweeps/train-{name}.toml --out $(RUNS)/{name}-trained" in make


# -- every command is documented -------------------------------------------------------------

def _commands() -> list[str]:
    from bench.cli import make_parser

    parser = make_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1, "bench's parser should have one subcommand action"
    return sorted(subparsers[0].choices)


def _code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S))


def _headings(markdown: str) -> list[str]:
    """The text of every ATX heading outside fenced code blocks."""
    headings, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            headings.append(m.group(1))
    return headings


def _documented_in(markdown: str, command: str) -> bool:
    in_heading = any(re.search(rf"\bbench {command}\b", h.replace("`", "")) for h in _headings(markdown))
    in_code = re.search(rf"^\s*bench {command}\b", _code_blocks(markdown), flags=re.M) is not None
    return in_heading or in_code


def test_every_command_is_documented():
    commands = _commands()
    assert {"run", "report", "compare"} <= set(commands)
    page = (DOCS / "commands.md").read_text()
    missing = [c for c in commands if not _documented_in(page, c)]
    assert not missing, f"docs/commands.md documents no heading or `bench NAME` example for {missing}"

    readme = (ROOT / "README.md").read_text()
    links_to_commands = re.search(r"\]\((\./)?docs/commands\.md(#[^)]*)?\)", readme) is not None
    not_in_readme = [c for c in commands if not _documented_in(readme, c)]
    assert links_to_commands or not not_in_readme, \
        f"README's cheat sheet lacks {not_in_readme} and README does not link docs/commands.md"


# -- every relative link resolves ------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than - and _
    removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    """Every heading's anchor; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _headings(markdown):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return anchors


def _links(markdown: str) -> list[str]:
    """Every inline link's target outside code (fenced blocks and `inline code`)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [m.group(1) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)]


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def test_docs_pages_exist():
    for name in ("commands", "backends", "quantisation", "methodology", "training", "serving", "dashboard",
                 "distributed", "results", "architecture", "testing", "README"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, "README.md should stay a two-minute read (12 KB at most)"
    unlinked = [p.relative_to(ROOT).as_posix() for p in sorted(DOCS.rglob("*.md"))
                if f"({p.relative_to(ROOT).as_posix()}" not in readme
                and f"({p.relative_to(DOCS).as_posix()}" not in (DOCS / "README.md").read_text()]
    assert not unlinked, f"neither README.md nor docs/README.md links {unlinked}"


def test_relative_links_resolve():
    broken = []
    for source in _markdown_files():
        for target in _links(source.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            where = source if not path else (source.parent / path).resolve()
            name = f"{source.relative_to(ROOT)} -> {target}"
            if not where.exists():
                broken.append(f"{name}: no such file")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where.read_text()):
                broken.append(f"{name}: no heading with that anchor")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_follows_github():
    assert _slug("Training cells: `bench run --scenario train`") == "training-cells-bench-run---scenario-train"
    assert _slug("ONNX Runtime's transformer fusions") == "onnx-runtimes-transformer-fusions"
    assert _slug("Quality: did the trained model learn?") == "quality-did-the-trained-model-learn"
    assert _slug("Ours against the peers, with compile and int4 beside them") == \
        "ours-against-the-peers-with-compile-and-int4-beside-them"
