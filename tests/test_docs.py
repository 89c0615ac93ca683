"""Every relative link, image and snippet include of README.md and docs/*.md points at a file that exists.

Fast and offline (no mkdocs needed): the pages are parsed with regular expressions.

- Markdown links ``[text](target)`` and images ``![alt](target)`` outside code are resolved
  against the page's folder (README.md: the repository root; docs/*.md: docs/).
- Snippet includes ``--8<-- "path"`` (pymdownx.snippets, ``base_path: docs``) are resolved against
  docs/, inside code blocks too (the extension expands them there as well); ``;--8<--`` is
  the escaped, literal form and is skipped.
- A ``#fragment`` must be the id of a heading of the target page (or of the page itself): as
  GitHub slugifies headings for README.md, as MkDocs (Python-Markdown's toc) does for docs/.
- Every page in mkdocs.yml's nav exists, and every docs/*.md page is in the nav.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+\1")
SNIPPET = re.compile(r"^\s*(;?)--8<--\s+\"([^\"]+)\"")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif line.strip().startswith(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def _heading_text(raw: str) -> str:
    """A heading's visible text: links become their text, emphasis and code marks go."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    return text.replace("`", "").replace("**", "").replace("__", "")


def github_slug(text: str) -> str:
    """GitHub's heading anchors (github-slugger): lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", _heading_text(text).strip().lower()).replace(" ", "-")


def mkdocs_slug(text: str) -> str:
    """Python-Markdown's toc slugify (MkDocs' default): ASCII only, punctuation dropped, runs of '-'/space -> '-'."""
    value = unicodedata.normalize("NFKD", _heading_text(text)).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(page: Path, slug) -> set[str]:
    """The heading ids of a page; repeated headings get the suffixes GitHub / Python-Markdown give them."""
    ids: set[str] = set()
    separator = "-" if slug is github_slug else "_"
    for _, line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        candidate, count = base, 0
        while candidate in ids:
            count += 1
            candidate = f"{base}{separator}{count}"
        ids.add(candidate)
    return ids


def references(page: Path):
    """(line number, kind, target) of every link, image and snippet include of a page."""
    text = page.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        match = SNIPPET.match(line)
        if match and not match.group(1):
            yield number, "snippet", match.group(2)
    for number, line in _prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):  # not links inside `code`
            yield number, "link", match.group(1)


def _slug_for(page: Path):
    return github_slug if page.parent == ROOT else mkdocs_slug


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_images_and_includes_resolve(page: Path):
    problems = []
    for number, kind, target in references(page):
        if kind == "snippet":
            if not (DOCS / target).is_file():
                problems.append(f"line {number}: snippet {target!r}: no file docs/{target}")
            continue
        if SCHEME.match(target) or target.startswith("//"):
            continue  # external: not checked offline
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if path and not resolved.exists():
            problems.append(f"line {number}: {target!r}: no file {resolved.relative_to(ROOT)}")
            continue
        if fragment and resolved.suffix == ".md":
            if fragment not in anchors(resolved, _slug_for(page)):
                problems.append(f"line {number}: {target!r}: no heading with id #{fragment} in {resolved.name}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s*-\s*(?:[^\n]*?:\s*)?([\w./-]+\.md)\s*$", config, flags=re.M))
    missing = sorted(name for name in nav if not (DOCS / name).is_file())
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"
    pages = {p.name for p in DOCS.glob("*.md")}
    assert not pages - nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"


def test_slugs_match_github_and_mkdocs():
    heading = "`fwdgrad compare` (what `make demo` runs): × bp, Flügel's K=16"
    assert github_slug(heading) == "fwdgrad-compare-what-make-demo-runs--bp-flügels-k16"
    assert mkdocs_slug(heading) == "fwdgrad-compare-what-make-demo-runs-bp-flugels-k16"
