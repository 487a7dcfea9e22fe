"""Job spec: keys, validation, flags-over-file merge, secret redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dedup_batch.config import JobSpec, load_spec
from dedup_batch.errors import ConfigError


def test_defaults_are_a_dry_run_with_chain_guard_at_eps() -> None:
    spec = JobSpec.from_mapping({"eps": 0.4})
    assert spec.mode == "plan" and not spec.dry_run
    assert spec.min_samples == 1 and spec.keep == "original"
    assert spec.keeper_distance() == 0.4


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"epz": 1}, "unknown key 'epz'"),
        ({"eps": -1}, "'eps' must be a positive number"),
        ({"eps": "abc"}, "'eps' must be a number"),
        ({"metric": "manhattan"}, "'metric' must be one of"),
        ({"keep": "random"}, "'keep' must be one of"),
        ({"mode": "delete"}, "'mode' must be 'plan'"),
        ({"max_delete": -3}, "'max_delete' must be >= 0"),
        ({"max_delete_fraction": 2}, "between 0 and 1"),
        ({"batch_size": 5000}, "at most 1000"),
        ({"features": [1, 2]}, "'features' must be a list"),
        ({"storage_options": "x"}, "'storage_options' must be a mapping"),
        ({"allow_pickle": "yes"}, "'allow_pickle' must be true or false"),
    ],
)
def test_bad_values_name_the_key(data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        JobSpec.from_mapping(data, source="job.yaml")


def test_yaml_null_and_none_disable_the_chain_guard(tmp_path: Path) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("eps: 0.3\nmax_keeper_distance: null\nfeatures: ./f/*.parquet\n")
    spec = JobSpec.from_mapping(load_spec(str(f)))
    assert spec.keeper_distance() is None and spec.features == ["./f/*.parquet"]
    assert JobSpec.from_mapping({"eps": 1, "max_keeper_distance": "none"}).keeper_distance() is None
    assert JobSpec.from_mapping({"eps": 1, "max_keeper_distance": "0.5"}).keeper_distance() == 0.5


def test_flags_override_the_file() -> None:
    spec = JobSpec.from_mapping({"eps": 0.3, "keep": "newest", "out": "a"})
    merged = spec.merged({"eps": 0.5, "out": None})
    assert merged.eps == 0.5 and merged.keep == "newest" and merged.out == "a"


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_spec(str(tmp_path / "nope.yaml"))


def test_required_keys_say_which_flag() -> None:
    with pytest.raises(ConfigError, match="'eps' is required: pass --eps"):
        JobSpec.from_mapping({}).require("eps")


def test_secrets_are_redacted_in_yaml() -> None:
    spec = JobSpec.from_mapping(
        {
            "storage_options": {
                "key": "AKIDEXAMPLE",
                "secret": "s3cr3t-value",
                "endpoint_url": "http://127.0.0.1:9",
            }
        }
    )
    text = spec.to_yaml()
    assert "s3cr3t-value" not in text and "AKIDEXAMPLE" not in text
    assert "http://127.0.0.1:9" in text


# -- a plan's job.yaml is input too ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("root: !!python/object/apply:os.system ['touch {marker}']\n", "not plain YAML"),
        ("eps: [1,\n", "not plain YAML"),
        ("- just\n- a list\n", "not a mapping"),
        (b"eps: \xc3\x28\n", "not plain YAML"),
    ],
)
def test_a_plan_whose_job_yaml_is_not_plain_yaml_is_refused(
    tmp_path: Path, text: str | bytes, match: str
) -> None:
    from dedup_batch.errors import InputError
    from dedup_batch.pipeline import _planned_spec

    marker = tmp_path / "ran"
    job = tmp_path / "plan" / "job.yaml"
    job.parent.mkdir()
    if isinstance(text, bytes):
        job.write_bytes(text)
    else:
        job.write_text(text.format(marker=marker))
    with pytest.raises(InputError, match=match) as exc:
        _planned_spec(str(job.parent), {})
    assert str(job) in str(exc.value) and "re-run 'dedup-batch plan'" in str(exc.value)
    assert not marker.exists()


@pytest.mark.slow
def test_python_tag_in_job_yaml_is_exit_2_naming_the_file(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    marker = tmp_path / "ran"
    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "job.yaml").write_text(
        f"root: !!python/object/apply:os.system ['touch {marker}']\neps: 0.3\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-m", "dedup_batch", "apply", str(plan), "--n-workers", "1"],
        env={**os.environ, "PYTHONPATH": repo},
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and str(plan / "job.yaml") in errors[0], proc.stderr[-2000:]
    assert not marker.exists()


def test_apply_checks_the_users_option_names_against_the_plans_root(tmp_path: Path) -> None:
    from dedup_batch.pipeline import _planned_spec

    plan = tmp_path / "plan"
    plan.mkdir()
    (plan / "job.yaml").write_text("root: s3://photos/lib\neps: 0.3\n")
    assert _planned_spec(str(plan), {"endpoint_url": "http://127.0.0.1:9"}).root == (
        "s3://photos/lib"
    )
    with pytest.raises(ConfigError, match="'endpoint' is not an option of s3fs"):
        _planned_spec(str(plan), {"endpoint": "http://127.0.0.1:9"})


def test_recorded_options_drop_userinfo_and_unknown_values() -> None:
    spec = JobSpec.from_mapping(
        {
            "storage_options": {
                "endpoint_url": "http://minio:pw-in-url-77@127.0.0.1:9000",
                "s3_additional_kwargs": {"SSECustomerKey": "sse-customer-key-77"},
                "connection_string": "AccountName=a;AccountKey=account-key-77",
                "credential": "credential-77",
                "client_kwargs": {"region_name": "eu-west-1"},
            }
        }
    )
    text = spec.to_yaml()
    for secret in (
        "pw-in-url-77",
        "minio",
        "sse-customer-key-77",
        "account-key-77",
        "credential-77",
    ):
        assert secret not in text
    recorded = yaml.safe_load(text)["storage_options"]
    assert recorded["endpoint_url"] == "http://127.0.0.1:9000"
    assert recorded["client_kwargs"] == {"region_name": "eu-west-1"}
    assert recorded["credential"] == "***"


def test_help_and_the_job_spec_load_no_numeric_stack() -> None:
    """`dedup-batch --help` and the job-spec check import neither numpy, pandas, scipy nor
    scikit-learn: the keep policies live in dedup_batch.policies, the stages load on use."""
    import os
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys, contextlib, io\n"
        "from dedup_batch.cli import main\n"
        "from dedup_batch.config import JobSpec\n"
        "JobSpec.from_mapping({'root': '/r', 'eps': 0.3, 'keep': 'original'})\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['plan', '--help'])\n"
        "print(sorted(m for m in ('numpy', 'pandas', 'scipy', 'sklearn') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
