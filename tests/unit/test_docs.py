"""The docs stay true to the code: the config reference is the schema's, every relative link
resolves, and the README stays a short guide that opens with the two commands."""

from __future__ import annotations

import ast
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


ARCHITECTURE = DOCS / "architecture.md"
CODE = re.compile(r"`([^`]+)`")
Row = tuple[list[str], list[str]]  # a row's backticked names: its first cell's, the rest's


def code_only(path: Path) -> bool:
    """A file that holds nothing but a docstring (or nothing): a package marker."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body)


def module_rows(page: Path) -> dict[str, list[Row]]:
    """The module tables, by the folder the paragraph above each names (`orchestrator/`,
    `workers/`): each row's backticked names in its first cell and in the rest of the row."""
    tables: dict[str, list[Row]] = {}
    root = None
    for line in prose_lines(page):
        if line.startswith("|"):
            cells = line.strip().strip("|").split("|")
            first, rest = CODE.findall(cells[0]), CODE.findall("|".join(cells[1:]))
            if root and first:
                tables.setdefault(root, []).append((first, rest))
        elif line.strip():
            named = [n for n in CODE.findall(line) if n in ("orchestrator/", "workers/")]
            root = named[-1].rstrip("/") if named else None
    return tables


def documented(rows: list[Row]) -> tuple[set[str], list[tuple[str, set[str]]]]:
    """The paths a table names, and its folder rows with the names each row gives in backticks.

    ``contract/workload.py``, ``protocol.py``: a bare name is in the folder of the name before
    it. ``engines/``: a folder row names its ``__init__.py``, and each module under it whose
    file name or stem the row gives in backticks (``torch_engine.py``, ``learner``)."""
    paths, folders = set(), []
    for first, rest in rows:
        folder = ""
        for name in first:
            if name.endswith("/"):
                paths.add(name + "__init__.py")
                folders.append((name, {n.rstrip("/") for n in first + rest}))
                continue
            path = name if "/" in name else folder + name
            folder = path.rpartition("/")[0] + "/" if "/" in path else ""
            paths.add(path)
    return paths, folders


def test_every_module_is_in_the_architecture_tables():
    """Every module under orchestrator/ and workers/ has its row in docs/architecture.md;
    ``__main__.py`` and an ``__init__.py`` holding only a docstring need none."""
    tables = module_rows(ARCHITECTURE)
    missing = []
    for root in ("orchestrator", "workers"):
        paths, folders = documented(tables.get(root, []))
        for file in sorted((REPO / root).rglob("*.py")):
            rel = str(file.relative_to(REPO / root))
            if "__pycache__" in file.parts or file.name == "__main__.py":
                continue
            if file.name == "__init__.py" and code_only(file):
                continue
            if rel in paths or any(
                rel.startswith(folder) and (file.name in names or file.stem in names)
                for folder, names in folders
            ):
                continue
            missing.append(f"{root}/{rel}")
    assert not missing, f"docs/architecture.md's module tables do not name: {missing}"


def test_the_architecture_tables_name_only_modules_that_exist():
    """A row left behind by a move names a file that is gone."""
    stale = []
    for root, rows in module_rows(ARCHITECTURE).items():
        for path in sorted(documented(rows)[0]):
            named = REPO / root / path  # a folder row's ``__init__.py``: its folder
            if not (named.parent.is_dir() if named.name == "__init__.py" else named.exists()):
                stale.append(f"{root}/{path}")
    assert not stale, f"docs/architecture.md's module tables name files that are gone: {stale}"
