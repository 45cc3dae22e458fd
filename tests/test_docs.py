"""The repository stands alone: every document a tracked file cites exists inside the repository, every
cited section of docs/*.md exists, docs/*.md number their sections in one format, and the README lists
every module and every preset.

Citations are found in tracked files with the suffixes below (and Makefiles):
  * markdown links `[text](target)`: in markdown (.md files, notebook markdown cells) every relative
    target, elsewhere targets ending in .md; resolved relative to the citing file;
  * bare path-like tokens ending in .md (`docs/method.md`, `README.md`): resolved relative to the
    repository root;
  * section citations `docs/<name>.md section N` (also `sections 1, 2 and 5`, `sections 1-4`, `§N`):
    N must be a numbered heading of that document.
http(s) and other URLs are skipped. A target outside the repository (`../...`, an absolute path) or
missing is an error.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".ipynb", ".md", ".sh", ".toml", ".yml")
NAMES = ("Makefile",)
MD = ".md"  # kept apart so that this file's own examples are not citations

URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s)>\]'\"`]+")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
BARE = re.compile(r"(?<![\w.~/-])(/?(?:\.{1,2}/|[\w-]+/)*[\w.-]*\w\.md)(?![\w/])")
NUMBER = r"\d+(?:\.\d+)*"
SECTION = re.compile(r"(docs/[\w.-]+\.md)[)\]`*]*\s*,?\s*(?:sections?|§)\s*"
                     rf"({NUMBER}(?:\s*(?:,|and|-|–|to)\s*{NUMBER})*)")
HEADING = re.compile(rf"^#{{2,6}}\s+({NUMBER})\.?\s+\S", re.M)


def tracked_files(root: Path = ROOT) -> list[Path]:
    """Files git tracks under root with a scanned suffix or name (a plain walk outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
        paths = [root / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "data", "build", "dist", "__pycache__", ".pytest_cache"}
        paths = [p for p in root.rglob("*") if p.is_file() and not skip & set(p.relative_to(root).parts)]
    return sorted(p for p in paths if p.suffix in SUFFIXES or p.name in NAMES)


def _text(path: Path) -> tuple[str, bool]:
    """(text to scan, is it markdown); a notebook contributes its cells' sources."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".ipynb":
        return raw, path.suffix == ".md"
    cells = json.loads(raw).get("cells", [])
    src = lambda c: "".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
    md = "\n".join(src(c) for c in cells if c.get("cell_type") == "markdown")
    code = "\n".join(src(c) for c in cells if c.get("cell_type") != "markdown")
    return md + "\n" + code, True


def section_numbers(doc: Path) -> set[str]:
    """The numbers of a document's numbered headings ('## 3. Title' -> '3', '### 3.2 Title' -> '3.2')."""
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def _cited_numbers(spec: str) -> list[str]:
    """'1, 2 and 5' -> [1, 2, 5]; '1-4' -> [1, 2, 3, 4] (ranges of sub-sections: both ends)."""
    out: list[str] = []
    parts = re.split(r"\s*(,|and|to|-|–)\s*", spec)
    numbers, seps = parts[0::2], parts[1::2]
    out.append(numbers[0])
    for sep, n in zip(seps, numbers[1:]):
        prev = out[-1]
        if sep in ("-", "–", "to") and prev.isdigit() and n.isdigit():
            out.extend(str(i) for i in range(int(prev) + 1, int(n) + 1))
        else:
            out.append(n)
    return out


def _resolve(root: Path, base: Path, target: str) -> tuple[Path | None, str]:
    """(resolved path, problem); problem is '' when the target is inside root."""
    if target.startswith("/"):
        return None, "is an absolute path"
    path = (base / target).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None, "points outside the repository"
    return path, ""


def citation_problems(root: Path, files: list[Path]) -> list[str]:
    """One line per bad citation: 'file:line: target: what is wrong'."""
    problems = []
    docs_sections: dict[Path, set[str]] = {}
    for f in files:
        text, markdown = _text(f)
        rel = f.relative_to(root)

        def report(pos: int, target: str, what: str):
            problems.append(f"{rel}:{text.count(chr(10), 0, pos) + 1}: {target}: {what}")

        text_no_urls = URL.sub(lambda m: " " * len(m.group()), text)
        blanked = text_no_urls
        for m in LINK.finditer(text_no_urls):
            target = m.group(1)
            blanked = blanked[:m.start()] + " " * (m.end() - m.start()) + blanked[m.end():]
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path_part = target.split("#", 1)[0]
            if not markdown and not path_part.endswith(MD):
                continue
            path, why = _resolve(root, f.parent, path_part)
            if why:
                report(m.start(), target, f"link {why}")
            elif not path.exists():
                report(m.start(), target, "link to a file that does not exist")
        for m in BARE.finditer(blanked):
            target = m.group(1)
            path, why = _resolve(root, root, target)
            if why:
                report(m.start(), target, f"cited document {why}")
            elif not path.is_file():
                report(m.start(), target, "cited document does not exist (bare names resolve from the repository root)")
        for m in SECTION.finditer(text_no_urls):
            doc = root / m.group(1)
            if not doc.is_file():
                continue  # reported above
            if doc not in docs_sections:
                docs_sections[doc] = section_numbers(doc)
            for n in _cited_numbers(m.group(2)):
                if n not in docs_sections[doc]:
                    report(m.start(), f"{m.group(1)} section {n}", "no such numbered section")
    return problems


def heading_problems(doc: Path) -> list[str]:
    """docs/*.md format: '## N. Title' with N = 1, 2, ... and '### N.M Title' with M = 1, 2, ... inside
    section N; deeper headings are free."""
    problems, section, sub = [], 0, 0
    in_code = False
    for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        if line.startswith("## "):
            section, sub = section + 1, 0
            if not re.match(rf"^## {section}\. \S", line):
                problems.append(f"{doc.name}:{i}: expected '## {section}. Title', got {line!r}")
        elif line.startswith("### "):
            sub += 1
            if not re.match(rf"^### {section}\.{sub} \S", line):
                problems.append(f"{doc.name}:{i}: expected '### {section}.{sub} Title', got {line!r}")
    return problems


# ----------------------------------------------------------------------------------------------

def test_every_cited_document_exists_in_the_repository():
    files = tracked_files()
    assert any(f.suffix == ".ipynb" for f in files) and (ROOT / "README.md") in files  # the scan sees the repo
    problems = citation_problems(ROOT, files)
    assert not problems, "bad citations:\n" + "\n".join(problems)


def test_docs_number_their_sections():
    docs = sorted((ROOT / "docs").glob("*" + MD))
    assert {d.stem for d in docs} >= {"method", "architecture", "mini-study"}
    for doc in docs:
        problems = heading_problems(doc)
        assert not problems, "\n".join(problems)
        assert "1" in section_numbers(doc)


def test_the_checker_finds_bad_citations(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"guide{MD}").write_text("# Guide\n\n## 1. One\n\n### 1.1 Detail\n\n## 2. Two\n")
    good = {
        f"README{MD}": f"See [the guide](docs/guide{MD}) and docs/guide{MD} section 1.1, "
                       f"docs/guide{MD} sections 1-2, `docs/guide{MD}` §2 and https://example.org/x/ELSEWHERE{MD}.\n",
        f"docs/index{MD}": f"[guide](guide{MD}#1-one), [readme](../README{MD}), README{MD}\n",
        "a.py": f'"""Cites docs/guide{MD} sections 1, 1.1 and 2; f"{{name}}{MD}" is no citation."""\n',
    }
    bad = {
        "b.py": (f"# see GONE{MD} section 3\n", f"GONE{MD}: cited document does not exist"),
        f"c{MD}": (f"[up](../outside{MD})\n", f"../outside{MD}: link points outside"),
        f"d{MD}": (f"[x](docs/missing{MD})\n", f"docs/missing{MD}: link to a file that does not exist"),
        "e.sh": (f"# [guide](docs/guide{MD}) section 3\n", f"docs/guide{MD} section 3: no such numbered section"),
        "f.toml": (f'readme = "../../elsewhere/NOTES{MD}"\n', "cited document points outside"),
        f"g{MD}": ("![plot](figures/none.png)\n", "figures/none.png: link to a file that does not exist"),
        "h.py": (f"# /abs/path/NOTES{MD}\n", "cited document is an absolute path"),
    }
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": [f"Method (docs/guide{MD} section 2.1)\n"]},
                    {"cell_type": "code", "metadata": {}, "source": ["x = 1\n"], "outputs": [],
                     "execution_count": None}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    for name, text in good.items():
        (tmp_path / name).write_text(text)
    for name, (text, _) in bad.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "n.ipynb").write_text(json.dumps(nb))
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert tracked_files(tmp_path) == sorted(p for p in files if p.suffix in SUFFIXES)  # no git: a plain walk

    problems = citation_problems(tmp_path, files)
    assert citation_problems(tmp_path, [tmp_path / n for n in good]) == []
    for name, (_, expected) in bad.items():
        hits = [p for p in problems if p.startswith(f"{name}:1: ")]
        assert len(hits) == 1 and expected in hits[0], (name, problems)
    assert [p for p in problems if p.startswith("n.ipynb:")] == [
        f"n.ipynb:1: docs/guide{MD} section 2.1: no such numbered section"]
    assert len(problems) == len(bad) + 1


def test_the_heading_check_rejects_other_formats(tmp_path):
    doc = tmp_path / f"x{MD}"
    doc.write_text("# T\n\n## 1. A\n\n### 1.1 B\n\n```\n## not a heading\n```\n\n## 2. C\n")
    assert heading_problems(doc) == [] and section_numbers(doc) == {"1", "1.1", "2"}
    doc.write_text("# T\n\n## 1 A\n\n### 1.2 B\n\n## Three\n")
    assert len(heading_problems(doc)) == 3


def test_readme_lists_every_module_and_preset():
    from ayt.config import PRESETS
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    modules = sorted(p.name for p in (ROOT / "ayt").glob("*.py"))
    assert len(modules) > 10
    assert [m for m in modules if f"ayt/{m}" not in readme] == []
    assert [p for p in PRESETS if not re.search(rf"`{re.escape(p)}`", readme)] == []
    assert "docs/method.md" in readme and "docs/architecture.md" in readme and "docs/mini-study.md" in readme


@pytest.mark.parametrize("spec,numbers", [("3", ["3"]), ("1, 2 and 5", ["1", "2", "5"]),
                                          ("1-4", ["1", "2", "3", "4"]), ("3.2 and 4", ["3.2", "4"]),
                                          ("2.1-2.3", ["2.1", "2.3"])])
def test_cited_section_lists(spec, numbers):
    assert _cited_numbers(spec) == numbers
