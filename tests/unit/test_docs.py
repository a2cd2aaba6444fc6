"""The docs stay true to the code: the config reference is the schema's, every relative link
resolves, and the README stays a short guide that opens with the two commands."""

from __future__ import annotations

import difflib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def config_reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (where brackets are code, not links)."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose_lines(path) if line.startswith("#")}


def test_config_reference_is_generated_from_the_schema():
    expected = config_reference().render()
    actual = (DOCS / "config.md").read_text() if (DOCS / "config.md").exists() else ""
    diff = "".join(list(difflib.unified_diff(
        actual.splitlines(keepends=True), expected.splitlines(keepends=True),
        "docs/config.md", "scripts/config_reference.py"))[:40])
    assert actual == expected, (
        "docs/config.md is not what workers/contract/config.py says: run `make docs` "
        f"(python scripts/config_reference.py --out docs/config.md) and commit it\n{diff}")


def test_every_config_field_has_a_description():
    # render() refuses a field or section without one; here the refusal is named.
    try:
        config_reference().render()
    except SystemExit as exc:
        pytest.fail(str(exc))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files(page: Path):
    broken = []
    for line in prose_lines(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            path_part, _, anchor = target.partition("#")
            if path_part.startswith("/"):
                broken.append(f"{target} (absolute: links must be relative)")
                continue
            resolved = (page.parent / path_part).resolve() if path_part else page
            if not resolved.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_readme_is_a_short_guide_that_opens_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move reference into docs/"
    assert lines[0].startswith("# ") and lines[1] == ""
    assert lines[2] == "```bash"
    assert lines[3].startswith("make train ") and lines[4].startswith("make test ")
    assert lines[5] == "```"


def test_readme_links_every_docs_page():
    text = (REPO / "README.md").read_text()
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name})" not in text]
    assert not missing, f"README.md does not link these docs pages: {missing}"
