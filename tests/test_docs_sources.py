"""Numbers in README.md and docs/ name committed results files: every such link resolves.

`mkdocs build --strict` (CI) checks every link of the site; this fast check covers the results
links of README.md too (GitHub paths, not part of the site) and runs without mkdocs installed.
"""
from __future__ import annotations

import re

from docs_commands import REPO, markdown_files

_LINK = re.compile(r"\]\(([^)\s#]*results/[^)\s#]+)(?:#[^)]*)?\)")


def _result_links(path):
    return [(path, target) for target in _LINK.findall(path.read_text(encoding="utf-8"))
            if not target.startswith(("http://", "https://"))]


def test_every_results_link_resolves_to_a_committed_file():
    links = [link for f in markdown_files() for link in _result_links(f)]
    missing = [f"{p.relative_to(REPO)} -> {t}" for p, t in links if not (p.parent / t).resolve().is_file()]
    assert not missing, "links to results files that do not exist:\n" + "\n".join(missing)
    # the links point into benchmarks/results/ (docs/results is a link to it), and there are many
    assert all((p.parent / t).resolve().is_relative_to(REPO / "benchmarks" / "results") for p, t in links)
    assert len(links) >= 30


def test_the_readme_results_table_names_its_sources():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "](benchmarks/results/deploy_matrix.md)" in section
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len(table) >= 4  # one results table, numbers with their source right below it
    matrix = (REPO / "benchmarks" / "results" / "deploy_matrix.md").read_text(encoding="utf-8")
    rows = [line for line in table if "¹" not in line]  # params / MACs cite accuracy.md instead
    numbers = re.findall(r"\d+\.\d+", "\n".join(rows))
    assert len(numbers) >= 10
    missing = [n for n in numbers if n not in matrix]
    assert not missing, f"README results numbers not in deploy_matrix.md: {missing}"
