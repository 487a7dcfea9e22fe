"""Secrets: the allow-list redaction, scrubbing, ``-o`` parsing, and every command's output.

The end-to-end tests run the real CLI (``python -m dedup_batch``) in subprocesses on a local
collection and on a moto S3 server (loopback only), with secrets under option names no
denylist knows and values YAML would change, then grep every byte printed or written.
"""

from __future__ import annotations

import os
import secrets as stdlib_secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_batch import progress
from dedup_batch.config import (
    TYPED_OPTIONS,
    JobSpec,
    check_option_names,
    parse_storage_options,
)
from dedup_batch.errors import ConfigError
from dedup_batch.secrets import (
    NON_SECRET_OPTIONS,
    REDACTED,
    redact,
    scrub,
    secret_values,
    strip_userinfo,
)
from dedup_batch.storage import Store

REPO = str(Path(__file__).resolve().parents[1])


def _secret(prefix: str = "") -> str:
    """A long random value nobody would write by accident, after a YAML-hostile prefix."""
    return prefix + stdlib_secrets.token_hex(12)


# -- redaction: an allow-list ------------------------------------------------------------------
def test_only_allow_listed_options_are_shown() -> None:
    opts = {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "tok-secret-1"},
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2, "mode": "std"}},
        "s3_additional_kwargs": {
            "SSECustomerKey": "ssec-secret-1",
            "SSECustomerAlgorithm": "AES256",
        },
        "connection_string": "DefaultEndpointsProtocol=https;AccountKey=acct-secret-1",
        "credential": "cred-secret-1",
        "key": "AKIDEXAMPLE",
        "region_name": ["not", "a", "scalar"],
    }
    assert redact(opts) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": REDACTED},
        "config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 2, "mode": "std"}},
        "s3_additional_kwargs": {"SSECustomerKey": REDACTED, "SSECustomerAlgorithm": "AES256"},
        "connection_string": REDACTED,
        "credential": REDACTED,
        "key": REDACTED,
        "region_name": REDACTED,
    }
    assert set(secret_values(opts)) == {
        "tok-secret-1",
        "ssec-secret-1",
        "DefaultEndpointsProtocol=https;AccountKey=acct-secret-1",
        "cred-secret-1",
        "AKIDEXAMPLE",
        "scalar",
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pw-secret@127.0.0.1:9000/p", "http://127.0.0.1:9000/p"),
        ("https://pw-only-secret@host.example", "https://host.example"),
        ("http://127.0.0.1:9000?token=q-secret#frag", "http://127.0.0.1:9000"),
        ("http://[::1]:9000", "http://[::1]:9000"),
        ("user:pw-secret@127.0.0.1:9000", REDACTED),  # no scheme: cannot be shown safely
        ("http://user:pw@[bad", REDACTED),
        ("127.0.0.1:9000", "127.0.0.1:9000"),
    ],
)
def test_endpoint_urls_lose_their_userinfo(url: str, shown: str) -> None:
    assert strip_userinfo(url) == shown
    assert redact({"endpoint_url": url}) == {"endpoint_url": shown}
    assert redact({"client_kwargs": {"endpoint_url": url}}) == {
        "client_kwargs": {"endpoint_url": shown}
    }


def test_endpoint_password_is_scrubbed_raw_and_decoded() -> None:
    opts = {"endpoint_url": "http://admin:p%40ss-secret-9@127.0.0.1:9"}
    values = secret_values(opts)
    assert "p%40ss-secret-9" in values and "p@ss-secret-9" in values
    text = "cannot reach http://admin:p%40ss-secret-9@127.0.0.1:9 (p@ss-secret-9)"
    out = scrub(text, opts)
    assert "ss-secret-9" not in out and "admin" not in out
    assert "127.0.0.1:9" in out


def test_scrub_hides_a_secret_that_contains_another_whole() -> None:
    out = scrub("a=abcd-secret-long b=abcd", ["abcd", "abcd-secret-long"])
    assert out == "a=*** b=***"
    assert scrub("abc is short", ["abc"]) == "abc is short"  # under MIN_SECRET_LEN


def test_store_errors_and_log_lines_use_the_same_policy() -> None:
    sse = _secret()
    store = Store("memory://bkt", {"s3_additional_kwargs": {"SSECustomerKey": sse}})
    assert sse not in store._scrub(f"refused {sse}")
    progress.register_secrets({"credential": sse})
    try:
        assert progress.scrub_message(f"x {sse} y") == "x *** y"
    finally:
        progress._settings.secrets.clear()


def test_tracebacks_in_text_logs_are_scrubbed() -> None:
    import io
    import logging

    sse, pw = _secret(), _secret()
    buf = io.StringIO()
    try:
        progress.configure_logging("text", stream=buf, progress="off")
        progress.register_secrets(
            {
                "s3_additional_kwargs": {"SSECustomerKey": sse},
                "endpoint_url": f"http://u:{pw}@127.0.0.1:9",
            }
        )
        try:
            raise OSError(f"refused key {sse} at http://u:{pw}@127.0.0.1:9")
        except OSError:
            logging.getLogger("dedup_batch.test").exception("storage failed")
            logging.getLogger("dedup_batch.test").error("again", exc_info=True)
    finally:
        root = logging.getLogger("dedup_batch")
        root.handlers[:] = []
        root.propagate = True
        progress._settings.secrets.clear()
    out = buf.getvalue()
    assert "Traceback" in out and "storage failed" in out
    assert sse not in out and pw not in out


def test_typed_options_are_non_secret() -> None:
    # A typed option's value is shown (job.yaml, summary.json): it must be on the allow-list.
    assert set(TYPED_OPTIONS) <= NON_SECRET_OPTIONS


# -- -o parsing: strings, typed options strict ---------------------------------------------------
@pytest.mark.parametrize("value", ["0123", "x #y", "yes", "[abc", "{a: 1}", "null", "", "a=b=c"])
def test_option_values_are_the_text_given(value: str) -> None:
    opts = parse_storage_options(
        [f"secret={value}", f"s3_additional_kwargs.SSECustomerKey={value}"]
    )
    assert opts == {"secret": value, "s3_additional_kwargs": {"SSECustomerKey": value}}
    spec = JobSpec.from_mapping({"storage_options": opts})
    assert spec.storage_options == opts


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("anon=true", {"anon": True}),
        ("anon=No", {"anon": False}),
        ("use_ssl=0", {"use_ssl": False}),
        ("default_block_size=0123", {"default_block_size": 123}),
        ("default_block_size=none", {"default_block_size": None}),
        ("listings_expiry_time=2.5", {"listings_expiry_time": 2.5}),
        ("config_kwargs.connect_timeout=5", {"config_kwargs": {"connect_timeout": 5.0}}),
        (
            "config_kwargs.retries.max_attempts=1",
            {"config_kwargs": {"retries": {"max_attempts": 1}}},
        ),
        ("client_kwargs.verify=false", {"client_kwargs": {"verify": False}}),
        ("client_kwargs.verify=/etc/ca.pem", {"client_kwargs": {"verify": "/etc/ca.pem"}}),
        (
            "config_kwargs.retries.mode=standard",
            {"config_kwargs": {"retries": {"mode": "standard"}}},
        ),
    ],
)
def test_typed_options_convert_strictly(item: str, expected: dict) -> None:
    spec = JobSpec.from_mapping({"storage_options": parse_storage_options([item])})
    assert spec.storage_options == expected


@pytest.mark.parametrize(
    "item",
    [
        "anon=maybe-{s}",
        "use_ssl=[{s}",
        "max_concurrency=-{s}",
        "default_block_size=1e{s}",
        "config_kwargs.read_timeout=nan{s}",
        "config_kwargs.retries.max_attempts=x #{s}",
    ],
)
def test_bad_typed_values_are_refused_without_echoing_them(item: str) -> None:
    s = _secret()
    with pytest.raises(ConfigError, match="must be") as exc:
        JobSpec.from_mapping({"storage_options": parse_storage_options([item.format(s=s)])})
    assert s not in str(exc.value)


@pytest.mark.parametrize(
    "data",
    [{"anon": "maybe"}, {"anon": 1}, {"max_concurrency": True}, {"max_concurrency": 2.5}],
)
def test_typed_options_from_a_job_spec_are_checked_too(data: dict) -> None:
    with pytest.raises(ConfigError, match="storage option"):
        JobSpec.from_mapping({"storage_options": data}, source="job.yaml")


def test_malformed_items_are_refused_without_echoing_them() -> None:
    s = _secret()
    for items in ([s], [f"={s}"], [f"a..b={s}"], [f"a={s}", f"a.b={s}"], [f"a.b={s}", f"a={s}"]):
        with pytest.raises(ConfigError) as exc:
            parse_storage_options(items)
        assert s not in str(exc.value)


def test_misspelt_option_names_say_what_was_meant() -> None:
    with pytest.raises(ConfigError, match="did you mean 'endpoint_url'"):
        parse_storage_options(["endpoint-url=http://u:pw@127.0.0.1:9"])
    with pytest.raises(ConfigError, match="'endpoint' is not an option of s3fs; did you mean"):
        JobSpec.from_mapping({"root": "s3://b/p", "storage_options": {"endpoint": "http://x"}})
    with pytest.raises(ConfigError, match=r"config_kwargs\.conect_timeout"):
        check_option_names({"config_kwargs": {"conect_timeout": 1}}, ["s3://b"])
    with pytest.raises(ConfigError, match="option names are letters"):
        JobSpec.from_mapping({"storage_options": {"endpoint-url": "http://x"}})
    # Other backends take options s3fs does not know; local roots take none at all.
    check_option_names({"connection_string": "x"}, ["az://c/p", "./local"])
    check_option_names({"profile": "p", "skip_instance_cache": True}, ["s3://b"])


def test_flags_extend_the_job_specs_nested_options() -> None:
    base = {"client_kwargs": {"region_name": "eu-west-1"}, "key": "k"}
    opts = parse_storage_options(["client_kwargs.verify=false"], base=base)
    assert opts == {"client_kwargs": {"region_name": "eu-west-1", "verify": "false"}, "key": "k"}
    assert base == {"client_kwargs": {"region_name": "eu-west-1"}, "key": "k"}


# -- generated cases -------------------------------------------------------------------------
_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
_values = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.lists(_names, min_size=1, max_size=3), _values), min_size=1, max_size=6)
)
def test_generated_options_round_trip_and_never_leak(items: list[tuple[list[str], str]]) -> None:
    flags = [f"{'.'.join(path)}={value}" for path, value in items]
    try:
        opts = parse_storage_options(flags)
    except ConfigError as exc:  # a name given both as a value and as a group
        assert "both as a value and as a group" in str(exc)
        for _, value in items:
            assert len(value) < 4 or value not in str(exc)
        return
    try:
        spec = JobSpec.from_mapping({"storage_options": opts})
    except ConfigError as exc:  # a typed option with a value of the wrong kind
        assert "must be" in str(exc)
        for _, value in items:
            assert len(value) < 4 or value not in str(exc)
        return
    shown = redact(spec.storage_options)
    hidden = secret_values(spec.storage_options)

    def leaves(node: dict, prefix: str = ""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    raw = dict(leaves(opts))
    for name, value in leaves(spec.storage_options):
        if name not in TYPED_OPTIONS:
            assert value == raw[name]  # the exact text given, never YAML-parsed
        if name not in NON_SECRET_OPTIONS:
            assert dict(leaves(shown))[name] == REDACTED
            if len(value) >= 4:
                assert value in hidden
                assert value not in scrub(f"error: {value}!", spec.storage_options)


@settings(max_examples=200, deadline=None)
@given(
    user=st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=10),
    password=st.text(st.characters(whitelist_categories=("L", "N", "P")), min_size=4, max_size=20),
)
def test_generated_endpoint_passwords_never_shown(user: str, password: str) -> None:
    from urllib.parse import quote

    url = f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:9000/x"
    opts = {"endpoint_url": url}
    shown = redact(opts)["endpoint_url"]
    assert shown == "http://127.0.0.1:9000/x"
    line = scrub(f"cannot reach {url}: {password}", opts)
    assert quote(password, safe="") not in line and password not in line


# -- every command, end to end ---------------------------------------------------------------
def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dedup_batch", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": REPO, **(env or {})},
        capture_output=True,
        timeout=240,
    )


def _leaks(secrets: list[str], outputs: list[bytes], folders: list[Path]) -> list[str]:
    """Every (secret, place) where a secret shows up, raw or percent-encoded."""
    from urllib.parse import quote

    found = []
    forms = {s: {s.encode(), quote(s, safe="").encode()} for s in secrets}
    blobs = [(f"output {i}", b) for i, b in enumerate(outputs)]
    for folder in folders:
        blobs += [(str(f), f.read_bytes()) for f in sorted(folder.rglob("*")) if f.is_file()]
    for where, blob in blobs:
        found += [f"{s!r} in {where}" for s in secrets if any(f in blob for f in forms[s])]
    return found


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_command_keeps_unusual_secrets_out_of_every_output(tmp_path: Path) -> None:
    from dedup_batch.demo import DEMO_EPS, make_demo

    info = make_demo(tmp_path / "demo", n_images=10, seed=3)
    root, features = info["root"], info["features"]
    values = {
        "ssec": _secret(),
        "account": _secret(),
        "credential": _secret("0123"),
        "password": _secret("x #y"),
        "token": _secret("[abc"),
        "endpoint_pw": _secret(),
        "yes": _secret("yes"),
    }
    options = [
        f"s3_additional_kwargs.SSECustomerKey={values['ssec']}",
        f"connection_string=DefaultEndpointsProtocol=https;AccountName=a;AccountKey="
        f"{values['account']}",
        f"credential={values['credential']}",
        f"password={values['password']}",
        f"sas_token={values['token']}",
        f"endpoint_url=http://dedup:{values['endpoint_pw']}@127.0.0.1:{_closed_port()}",
        f"client_kwargs.aws_session_token={values['yes']}",
        "client_kwargs.region_name=eu-west-1",
        "anon=false",
    ]
    o = [arg for opt in options for arg in ("-o", opt)]
    plan_dir, run_dir, trash, sweep = (tmp_path / n for n in ("plan", "run", "trash", "sweep"))
    common = ["--n-workers", "1"]
    runs = [
        _cli(
            "--debug",
            "plan",
            "--features",
            features,
            "--root",
            root,
            "--eps",
            str(DEMO_EPS),
            "--out",
            str(plan_dir),
            *o,
            *common,
            cwd=tmp_path,
        ),
        _cli("report", str(plan_dir), *o, cwd=tmp_path),
        _cli(
            "apply",
            str(plan_dir),
            "--trash",
            str(trash),
            "--max-delete-fraction",
            "1",
            *o,
            *common,
            cwd=tmp_path,
        ),
        _cli("--log-format", "json", "restore", str(plan_dir), *o, *common, cwd=tmp_path),
        _cli(
            "run",
            "--apply",
            "--features",
            features,
            "--root",
            root,
            "--eps",
            str(DEMO_EPS),
            "--out",
            str(run_dir),
            "--dry-run",
            *o,
            *common,
            cwd=tmp_path,
        ),
        _cli(
            "sweep",
            "--features",
            features,
            "--root",
            root,
            "--eps-min",
            "0.1",
            "--eps-max",
            "0.5",
            "--steps",
            "3",
            "--out",
            str(sweep),
            *o,
            *common,
            cwd=tmp_path,
        ),
    ]
    for r in runs:
        assert r.returncode == 0, (r.args, r.stderr.decode()[-3000:])
    # the options were used as given: the plan records what may be shown, and nothing else
    job = (plan_dir / "job.yaml").read_text()
    assert "endpoint_url: http://127.0.0.1:" in job and "region_name: eu-west-1" in job
    assert "anon: false" in job and "SSECustomerKey: '***'" in job
    assert "restored" in runs[3].stderr.decode() + runs[3].stdout.decode()

    outputs = [b for r in runs for b in (r.stdout, r.stderr)]
    leaks = _leaks(list(values.values()), outputs, [tmp_path])
    assert not leaks, leaks


@pytest.mark.slow
def test_command_errors_name_the_option_never_its_value(tmp_path: Path) -> None:
    s = _secret("x #y")
    port = _closed_port()
    plan = ["plan", "--features", "s3://photos/f/*.parquet", "--root", "s3://photos/lib"]
    plan += ["--eps", "0.3", "--out", str(tmp_path / "p"), "--n-workers", "1"]
    no_creds = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    cases = {
        "typed": ([*plan, "-o", f"anon={s}"], None, "storage option 'anon' must be true or false"),
        "no equals": ([*plan, "-o", s], None, "is not KEY=VALUE"),
        "misspelt": (
            [*plan, "-o", f"endpoint-url=http://u:{s}@127.0.0.1:{port}"],
            None,
            "did you mean 'endpoint_url'",
        ),
        "unknown": ([*plan, "-o", f"credential={s}"], None, "'credential' is not an option of"),
        "unreachable": (
            [
                "--debug",
                *plan,
                "-o",
                f"endpoint_url=http://127.0.0.1:{port}",
                "-o",
                f"secret={s}",
                "-o",
                "key=0123456789",
                "-o",
                "config_kwargs.retries.max_attempts=1",
            ],
            None,
            f"cannot reach the storage endpoint http://127.0.0.1:{port}",
        ),
        "no credentials": (
            [*plan, "-o", "config_kwargs.retries.max_attempts=1"],
            no_creds,
            "no usable credentials",
        ),
        "apply, misspelt": (
            ["apply", str(tmp_path / "p"), "-o", f"endpoint-url={s}"],
            None,
            "did you mean 'endpoint_url'",
        ),
    }
    outputs = []
    for name, (args, env, message) in cases.items():
        # loopback only, even where an option is refused before any request
        r = _cli(
            *args,
            cwd=tmp_path,
            env={"AWS_ENDPOINT_URL": no_creds["AWS_ENDPOINT_URL"], **(env or {})},
        )
        err = r.stderr.decode()
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert r.returncode == 2, (name, err[-2000:])
        assert len(lines) == 1 and message in lines[0], (name, err[-2000:])
        outputs += [r.stdout, r.stderr]
    leaks = _leaks([s], outputs, [tmp_path])
    assert not leaks, leaks


@pytest.mark.s3
@pytest.mark.slow
def test_yaml_hostile_credentials_work_on_s3_and_are_never_written(
    s3, s3fs_client, tmp_path: Path
) -> None:
    from dedup_batch.demo import DEMO_EPS, make_demo

    info = make_demo(tmp_path / "demo", n_images=8, seed=5)
    photos = Path(info["root"])
    s3fs_client.mkdir("photos")

    def upload() -> set[str]:
        names = set()
        for f in photos.rglob("*"):
            if f.is_file():
                name = f.relative_to(photos).as_posix()
                s3fs_client.pipe(f"photos/lib/{name}", f.read_bytes())
                names.add(name)
        s3fs_client.invalidate_cache()
        return names

    def listed() -> set[str]:
        s3fs_client.invalidate_cache()
        return {k[len("photos/lib/") :] for k in s3fs_client.find("photos/lib")}

    images = upload()
    for f in sorted((tmp_path / "demo" / "features").glob("*.parquet")):
        s3fs_client.pipe(f"photos/features/{f.name}", f.read_bytes())
    # moto takes any key pair: these reach botocore only if they stay the strings given
    key, secret, token = _secret("0123"), _secret("x #y"), _secret("yes")
    o = [
        *("-o", f"endpoint_url={s3['endpoint_url']}"),
        *("-o", f"key={key}"),
        *("-o", f"secret={secret}"),
        *("-o", f"token={token}"),
        *("-o", "config_kwargs.retries.max_attempts=2"),
    ]
    plan = ["plan", "--features", "s3://photos/features/*.parquet", "--root", "s3://photos/lib"]
    plan += ["--eps", str(DEMO_EPS), "--n-workers", "1"]
    apply = ["--n-workers", "1", "--max-delete-fraction", "1"]  # the demo is mostly copies

    # 1. A local plan; then 'apply DIR' with no -o at all: the recorded endpoint_url is used
    #    (AWS_ENDPOINT_URL points nowhere) and the credentials come from the environment.
    local_plan = tmp_path / "local-plan"
    nowhere = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}
    runs = [_cli(*plan, "--out", str(local_plan), "--no-report", *o, cwd=tmp_path)]
    runs.append(_cli("apply", str(local_plan), *apply, cwd=tmp_path, env=nowhere))
    for r in runs:
        assert r.returncode == 0, (r.args, r.stderr.decode()[-3000:])
    assert len(listed()) == len(images) - info["duplicates"]
    job = (local_plan / "job.yaml").read_text()
    assert f"endpoint_url: {s3['endpoint_url']}" in job

    # 2. Everything in the bucket: plan, report, apply.
    upload()
    plan_url = "s3://photos/plans/p"
    runs += [
        _cli(*plan, "--out", plan_url, *o, cwd=tmp_path),
        _cli("report", plan_url, *o, cwd=tmp_path),
        _cli("apply", plan_url, *apply, *o, cwd=tmp_path),
    ]
    for r in runs:
        assert r.returncode == 0, (r.args, r.stderr.decode()[-3000:])
    assert len(listed()) == len(images) - info["duplicates"]
    written = {k: s3fs_client.cat(k) for k in s3fs_client.find("photos/plans")}
    assert {"job.yaml", "summary.json", "plan.parquet"} <= {k.rsplit("/", 1)[1] for k in written}
    outputs = [b for r in runs for b in (r.stdout, r.stderr)] + list(written.values())
    leaks = _leaks([key, secret, token], outputs, [tmp_path])
    assert not leaks, leaks
