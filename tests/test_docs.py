"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file (and a
heading, when it names one), and the product's text describes the product, not how it was made."""

import inspect
import re
from pathlib import Path

import pytest

import regopt

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lowercase, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").lower()).replace(" ", "-") for h in headings}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target)]


def test_there_are_reference_pages():
    assert len(PAGES) >= 4  # the README and at least three pages in docs/


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, broken


def test_the_anchor_rule_matches_github():
    page = ROOT / "docs" / "speed.md"
    assert {"gpu-nvidia-h200", "what-was-tried"} <= heading_anchors(page)


# The story of how the project was made (tracker numbers, machines on loan, the build's own tooling) has no
# place in what users read, nor has a design file outside the repository (the paper's formulas and protocol are
# docs/method.md). Raw result logs and the Fashion-MNIST results write-up are records, not product.
NARRATION = re.compile(
    r"\bissues? +\d+|(?<![\w/&])#\d+\b|\blent (?:GPU|H\d00|machine)|\bborrowed\b|\bcarry=\[|device budget|SPEC\.md",
    re.I,
)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".txt", ".yml", ".yaml"}
RECORDS = ("benchmarks/results/", "benchmarks/RESULTS_fmnist.md", "tests/test_docs.py")


def product_text_files() -> list[Path]:
    roots = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    for folder in ("docs", "regopt", "benchmarks", "tests", "examples"):
        roots += [p for p in (ROOT / folder).rglob("*") if p.suffix in TEXT_SUFFIXES]
    return [p for p in roots if p.is_file() and not p.relative_to(ROOT).as_posix().startswith(RECORDS)]


def test_product_text_does_not_narrate_its_making():
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in product_text_files()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if NARRATION.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("name", ["MicroBatchSGD", "GradNormSGD", "FisherTraceSGD", "JacobianRegSGD", "GraftedSGD"])
def test_public_classes_show_their_real_signature_and_document_every_argument(name):
    cls = getattr(regopt, name)
    parameters = inspect.signature(cls).parameters
    hidden = [p.name for p in parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not hidden, f"{name}'s signature hides its arguments behind {hidden}"
    undocumented = [p for p in parameters if not re.search(rf"(^|[ ,]){p}[:,]", cls.__doc__, re.M)]
    assert not undocumented, f"{name}'s docstring does not describe {undocumented}"
