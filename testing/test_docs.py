"""The docs stay true to the code: the generated config reference, the CI command, the links."""
from __future__ import annotations

from testing.conftest import REPO
from utils.config_doc import config_reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_config_reference_is_current():
    text = (REPO / "docs" / "config.md").read_text()
    block = text.split(START)[1].split(END)[0].strip()
    assert block == config_reference(), "run: python -m utils.config_doc and paste between the markers of docs/config.md"


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = [l for l in ci.splitlines() if "pytest" in l and not l.startswith("#")][0].strip()
    assert test_command in readme


def test_markdown_links_point_to_files_in_the_repository():
    """Every relative link of the README and the docs names a file or folder that exists, inside the repository."""
    import re
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "experiments").rglob("README.md")), REPO / "benchmarks" / "RESULTS.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            if "://" not in target and (not path.exists() or not path.is_relative_to(REPO.resolve())):
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_is_a_short_guide():
    """README.md stays a newcomer's guide (issue 24): history and references live in docs/ and benchmarks/."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to docs/ (at most 150)"


def test_adding_a_task_page_gives_the_contract_as_the_code_has_it():
    """docs/adding_a_task.md (issue 26 point 3), linked from the README, names every parameter of the
    task contract's methods, in the code's order."""
    import inspect
    import re

    from core.dataset import BaseDataLoader, BaseDataset
    page = (REPO / "docs" / "adding_a_task.md").read_text()
    assert "](docs/adding_a_task.md)" in (REPO / "README.md").read_text()
    for method in (BaseDataset.__init__, BaseDataset.load_split, BaseDataLoader.__init__, BaseDataLoader.batches):
        names = [n for n in inspect.signature(method).parameters if n not in ("self", "cls")]
        pattern = r"\([^)]*?" + r"[^)]*?".join(rf"\b{n}\b" for n in names)
        assert re.search(pattern, page), f"{method.__qualname__}{names} not given in docs/adding_a_task.md"
    for needed in ("inputs", "labels", "torch.from_numpy", "Without an official test split", "UserError"):
        assert needed in page
