"""The CLI's job-spec flags come from the JobSpec field metadata: every key is a flag with help,
every command's --help lists the flags its fields declare, and a flag overrides the file."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from dedup_batch.cli import _parser, _spec, main
from dedup_batch.config import CLI, GLOBAL, Flag, JobSpec


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags_of(command: str) -> list[tuple[str, Flag]]:
    """(key, Flag) for every flag the JobSpec fields declare for ``command``."""
    return [
        (f.name, flag)
        for f in dataclasses.fields(JobSpec)
        for flag in f.metadata.get(CLI, ())
        if command in flag.commands or GLOBAL in flag.commands
    ]


def _spelling(key: str, flag: Flag) -> tuple[str, ...]:
    return flag.flags or ("--" + key.replace("_", "-"),)


def _squeeze(text: str) -> str:
    # argparse rewraps help text (and may break after a hyphen): compare without whitespace
    return "".join(text.split())


@pytest.mark.parametrize("key", [f.name for f in dataclasses.fields(JobSpec)])
def test_every_job_spec_key_has_help_and_is_a_flag_of_run(key: str) -> None:
    field = next(f for f in dataclasses.fields(JobSpec) if f.name == key)
    flags = field.metadata.get(CLI, ())
    assert flags, f"{key}: no flag declared in its field metadata"
    assert all(flag.help.strip() for flag in flags), f"{key}: a flag without help"
    run = {o: a for a in _commands()["run"]._actions for o in a.option_strings}
    of_run = [f for k, f in _flags_of("run") if k == key]
    assert of_run, f"{key} is not a flag of run"
    for flag in of_run:
        for spelling in _spelling(key, flag):
            action = run[spelling]
            assert action.help == flag.help
            assert action.dest == (flag.dest or key)


def test_every_flag_names_real_commands() -> None:
    known = {*_commands(), GLOBAL}
    for f in dataclasses.fields(JobSpec):
        for flag in f.metadata.get(CLI, ()):
            assert set(flag.commands) <= known, (f.name, set(flag.commands) - known)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_of_every_command_lists_its_job_spec_flags(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = _squeeze(capsys.readouterr().out)
    flags = _flags_of(command)
    assert flags or command not in ("plan", "run", "sweep"), command
    for key, flag in flags:
        for spelling in _spelling(key, flag):
            assert spelling in out, (command, key, spelling)
        assert _squeeze(flag.help) in out, (command, key)


def test_a_flag_overrides_the_file_and_an_absent_flag_does_not(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("root: /images\nallow_pickle: true\nreport: false\nembed_batch_size: 4\n")
    args = _parser().parse_args(
        ["embed", "--config", str(job), "--out", "/shards", "--batch-size", "8"]
    )
    spec = _spec(args)
    # embed spells embed_out and embed_batch_size --out and --batch-size
    assert spec.embed_out == "/shards" and spec.embed_batch_size == 8
    # store_true / store_false flags not given leave the file's value
    assert spec.root == "/images" and spec.allow_pickle is True and spec.report is False
    args = _parser().parse_args(["run", "--config", str(job), "--apply", "-o", "anon=true"])
    spec = _spec(args)
    # --apply and -o are read by the command, never stored as keys of their own
    assert args.apply is True and spec.mode == "plan"
    assert spec.storage_options == {"anon": True}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--min-samples", "x"], "argument --min-samples: invalid int value: 'x'"),
        (["plan", "--metric", "manhattan"], "argument --metric: invalid choice: 'manhattan'"),
        (["sweep", "--eps-min", "1", "--eps-max", "2", "--keep", "original"], "invalid choice"),
        (["restore", "DIR", "--batch-size", "5"], "unrecognized arguments: --batch-size 5"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
