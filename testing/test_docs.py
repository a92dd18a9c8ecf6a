"""The docs stay true to the code: the generated config reference, the CI command, the links."""
from __future__ import annotations

from testing.conftest import REPO
from utils.config_doc import config_reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_readme_config_reference_is_current():
    text = (REPO / "README.md").read_text()
    block = text.split(START)[1].split(END)[0].strip()
    assert block == config_reference(), "run: python -m utils.config_doc and paste between the markers"


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = [l for l in ci.splitlines() if "pytest" in l and not l.startswith("#")][0].strip()
    assert test_command in readme


def test_markdown_links_point_to_files_in_the_repository():
    """Every relative link of the README and the docs names a file or folder that exists."""
    import re
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "experiments").rglob("README.md")), REPO / "benchmarks" / "RESULTS.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
