"""Every table and figure the README and the site show was written by `make results` (docs/results.py).

The published files carry a provenance header and are listed in docs/results/manifest.json with
their SHA-256; the README's results blocks are the files' tables, not copies typed by hand.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
RESULTS = os.path.join(DOCS, "results")

spec = importlib.util.spec_from_file_location("docs_results", os.path.join(DOCS, "results.py"))
results = importlib.util.module_from_spec(spec)
sys.modules["docs_results"] = results  # dataclasses look their module up there
spec.loader.exec_module(results)

SNIPPET = re.compile(r'^-{1,2}8<-{1,2}\s+"(results/[^"]+)"', re.M)
IMAGE_OR_LINK = re.compile(r"\]\(((?:docs/)?results/[^)#\s]+)\)")


def referenced_results() -> dict[str, list[str]]:
    """results/<area>/<file> -> the pages (README or docs/*.md) that show it."""
    pages = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(DOCS, "*.md"))]
    found: dict[str, list[str]] = {}
    for page in pages:
        with open(page) as file:
            text = file.read()
        names = SNIPPET.findall(text) + [m.removeprefix("docs/") for m in IMAGE_OR_LINK.findall(text)]
        names += [f"results/{match['path']}" for match in results.README_BLOCK.finditer(text)]
        for name in names:
            found.setdefault(name.removeprefix("results/"), []).append(os.path.relpath(page, ROOT))
    return found


def manifest() -> dict:
    with open(os.path.join(RESULTS, "manifest.json")) as file:
        return json.load(file)


def test_the_pages_show_results():
    assert referenced_results(), "no page includes a results file"


@pytest.mark.parametrize("name", sorted(referenced_results()))
def test_every_shown_result_was_written_by_make_results(name):
    pages = referenced_results()[name]
    path = os.path.join(RESULTS, name)
    assert os.path.isfile(path), f"{name} (shown by {pages}) does not exist: run `make results`"
    entry = manifest().get(name)
    assert entry is not None, f"{name} is not in docs/results/manifest.json: it was not written by make results"
    with open(path, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == entry["sha256"], f"{name} was edited after make results"
    assert entry["quick"] is False, f"{name} was made with --quick sizes"
    for key in ("command", "date", "device", "torch", "threads", "load_before", "load_after"):
        assert entry.get(key) not in (None, ""), f"{name}: the manifest lacks {key}"
    if name.endswith(".md"):
        with open(path) as file:
            text = file.read()
        header = results.HEADER.match(text)
        assert header, f"{name} lacks the provenance header of make results"
        facts = json.loads(header[1])
        assert facts["command"] == entry["command"] and facts["quick"] is False
        assert f"`{entry['command']}`" in text.strip().splitlines()[-1], "the caption names the command"


def test_the_readme_blocks_are_the_results_files():
    with open(os.path.join(ROOT, "README.md")) as file:
        readme = file.read()
    blocks = list(results.README_BLOCK.finditer(readme))
    assert blocks, "the README shows no results block"
    for block in blocks:
        with open(os.path.join(RESULTS, block["path"])) as file:
            expected = results.strip_header(file.read()).strip()
        assert block[3].strip() == expected, f"README block {block['path']} differs from the file: run make results"


def test_every_manifest_entry_exists():
    for name in manifest():
        assert os.path.isfile(os.path.join(RESULTS, name)), f"manifest lists {name}, which is missing"


# ------------------------------------------------------------------ the runner's own pieces

def test_expected_projection_cosine_matches_the_beta_distribution():
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    for n, k in [(64, 1), (64, 16), (1024, 16), (100, 99)]:
        exact = stats.beta(k / 2, (n - k) / 2).expect(np.sqrt)
        assert results.expected_projection_cosine(n, k) == pytest.approx(exact, rel=1e-6)
    assert results.expected_projection_cosine(64, 64) == 1.0


def test_a_published_file_carries_header_and_caption_and_refreshes_the_readme(tmp_path):
    recorder = results.Recorder("area", str(tmp_path), str(tmp_path), False, 2)
    recorder.facts = {"area": "area", "date": "2026-11-26T10:00:00+00:00", "device": "CPU X", "torch": "2.14.1",
                      "threads": 2, "load_before": 0.1, "quick": False}
    recorder.publish_text("| a |\n|---|\n| 1 |", "t.md", "fwdgrad bench")
    recorder.finish()
    text = (tmp_path / "area" / "t.md").read_text()
    assert json.loads(results.HEADER.match(text)[1])["command"] == "fwdgrad bench"
    assert text.strip().endswith("load average 0.1 at the start.*") and "`fwdgrad bench`" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: area/t.md -->\nold\n<!-- /results -->\nend\n")
    assert results.refresh_readme(str(tmp_path), str(readme)) == 1
    refreshed = readme.read_text()
    assert "old" not in refreshed and "| 1 |" in refreshed and "fwdgrad-results" not in refreshed
    assert refreshed.startswith("intro\n") and refreshed.endswith("<!-- /results -->\nend\n")


def test_table_lines_takes_the_printed_table_and_its_title():
    printed = "[1/2] bp\nbaydin_mlp on mnist5k, 3 epochs\n| a | b |\n|---|---|\n| 1 | 2 |\nwrote x\n"
    assert results.table_lines(printed) == "baydin_mlp on mnist5k, 3 epochs\n\n| a | b |\n|---|---|\n| 1 | 2 |"


def test_bad_arguments_are_one_line(capsys):
    assert results.main(["nowhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nowhere'" in err[0] and "main_job" in err[0]


def test_every_results_file_is_in_the_manifest():
    """Nothing under docs/results/ that make results did not write (a stale or hand-made file)."""
    listed = set(manifest())
    for root, _, files in os.walk(RESULTS):
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), RESULTS)
            assert relative == "manifest.json" or relative in listed, f"{relative} is not in the manifest"


def test_a_run_stopped_after_an_area_keeps_that_area_in_the_manifest(tmp_path, monkeypatch):
    """The manifest is written after each area, not at the end: a run killed later loses nothing finished."""
    def first(r):
        r.publish_text("| a |\n|---|\n| 1 |", "t.md", "fwdgrad bench")

    def second(r):
        raise KeyboardInterrupt  # the run is stopped from outside (Ctrl-C, a killed session)

    monkeypatch.setattr(results, "AREAS", {"first": results.Area("first", first, "one table", 0),
                                           "second": results.Area("second", second, "fails", 0)})
    with pytest.raises(KeyboardInterrupt):
        results.main(["--quick", "--out", str(tmp_path), "first", "second"])
    entry = json.loads((tmp_path / "manifest.json").read_text())["first/t.md"]
    with open(tmp_path / "first" / "t.md", "rb") as file:
        assert entry["sha256"] == hashlib.sha256(file.read()).hexdigest()
    assert entry["command"] == "fwdgrad bench"
