"""The README is the front door: its commands, the CLI and the job specs must agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dedup_batch.cli import _parser
from dedup_batch.config import JobSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _commands() -> list[str]:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"dedup-batch {command}" in README or f"`{command}" in README


def test_the_two_front_door_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert blocks[0].strip().endswith("dedup-batch demo")
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd in ci, ".ci/run must run exactly the README's test command"


@pytest.mark.parametrize("spec", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_specs_are_valid(spec: Path) -> None:
    JobSpec.from_mapping(load_spec(str(spec)), source=str(spec))


def test_every_job_spec_key_is_a_flag() -> None:
    import dataclasses

    flags = {
        o
        for a in _parser()._subparsers._group_actions[0].choices["run"]._actions
        for o in a.option_strings
    }
    special = {
        "storage_options": "--storage-option",
        "mode": "--apply",
        "report": "--no-report",
        "log_format": None,
    }  # log_format: a global flag
    for field in dataclasses.fields(JobSpec):
        flag = special.get(field.name, "--" + field.name.replace("_", "-"))
        assert flag is None or flag in flags, field.name


def test_every_module_is_in_the_architecture_map() -> None:
    """docs/architecture.md's module table names every module of the package (and only them)."""
    pkg = REPO / "dedup_batch"
    modules = {
        p.stem if p.is_file() else p.name
        for p in pkg.iterdir()
        if (p.suffix == ".py" and not p.stem.startswith("_")) or (p / "__init__.py").exists()
    }
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("| module |", 1)[1].split("\n\n", 1)[0]
    mapped = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert modules - mapped == set(), "modules missing from docs/architecture.md"
    assert mapped - modules == set(), "docs/architecture.md names modules that do not exist"


def test_architecture_links_stay_inside_the_repository() -> None:
    """docs/architecture.md is the map of this repository: its links name files in it (a link
    to a web page goes stale without anyone noticing)."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert not re.search(r"https?://", text), "docs/architecture.md links outside the repository"
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert (REPO / "docs" / target).resolve().is_relative_to(REPO), target
        assert (REPO / "docs" / target).exists(), f"broken link {target}"
