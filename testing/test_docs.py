"""README's config reference is generated from the pydantic models and must match them."""
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
