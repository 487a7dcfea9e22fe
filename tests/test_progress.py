"""Progress: stage events, JSON lines, heartbeats off a terminal, a bar on one, Dask futures."""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dedup_batch import progress
from dedup_batch.progress import (
    StageTimer,
    configure_logging,
    log_dashboard,
    register_secrets,
    stage,
    track,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_logging():
    """Each test configures logging its own way; put the package back afterwards."""
    yield
    root = logging.getLogger("dedup_batch")
    root.handlers[:] = []
    root.propagate = True
    progress._settings.mode = "off"
    progress._settings.stream = None
    progress._settings.secrets.clear()


def _json_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_parse_and_carry_stage_fields():
    buf = io.StringIO()
    configure_logging("json", logging.INFO, stream=buf, heartbeat_s=0.05)
    with stage("load", total=4, unit="files") as st:
        st.advance(3)
        time.sleep(0.3)  # several heartbeat intervals
        st.advance()
    logging.getLogger("dedup_batch.x").warning("plain %s", "message", extra={"rows": 7})
    events = _json_lines(buf)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "stage_start" and "stage_end" in kinds
    assert "heartbeat" in kinds
    beat = next(e for e in events if e["event"] == "heartbeat")
    assert beat["stage"] == "load" and beat["done"] == 3 and beat["total"] == 4
    assert beat["unit"] == "files" and beat["elapsed"] >= 0
    end = next(e for e in events if e["event"] == "stage_end")
    assert end["done"] == 4 and end["level"] == "INFO" and end["elapsed"] >= 0.3
    plain = events[-1]
    assert plain == {
        **plain,
        "event": "log",
        "level": "WARNING",
        "message": "plain message",
        "rows": 7,
        "logger": "dedup_batch.x",
    }
    assert plain["time"].endswith("Z")


def test_failed_stage_is_logged_and_reraised_and_timed():
    buf = io.StringIO()
    configure_logging("json", stream=buf, progress="off")
    timer = StageTimer()
    with pytest.raises(RuntimeError, match="boom"), timer.stage("cluster", total=2) as st:
        st.advance()
        raise RuntimeError("boom")
    with timer.stage("select"):
        pass
    events = _json_lines(buf)
    failed = [e for e in events if e["event"] == "stage_failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "cluster" and failed[0]["done"] == 1
    assert failed[0]["level"] == "ERROR"
    assert set(timer.timings) == {"cluster", "select"}
    assert all(v >= 0 for v in timer.timings.values())


def test_heartbeats_in_a_pipe(tmp_path):
    """A real subprocess whose stderr is a pipe (not a TTY): text heartbeats, no bar."""
    code = textwrap.dedent("""
        import time
        from dedup_batch.progress import configure_logging, stage
        configure_logging("text")
        with stage("apply", total=5, unit="batches") as st:
            for _ in range(5):
                time.sleep(0.12)
                st.advance()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), progress.HEARTBEAT_ENV: "0.05"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = proc.stderr.splitlines()
    beats = [ln for ln in lines if " apply: " in ln and "/5 batches" in ln]
    assert len(beats) >= 3, proc.stderr
    assert "elapsed" in beats[0]
    assert "\r" not in proc.stderr and "[#" not in proc.stderr
    assert "apply: done in" in lines[-1]


def test_bar_on_a_terminal():
    """Under a pseudo-terminal the stage draws a bar in place (carriage returns, percent)."""
    code = textwrap.dedent("""
        import logging, time
        from dedup_batch.progress import configure_logging, stage
        configure_logging("text")
        with stage("apply", total=4, unit="batches") as st:
            for _ in range(4):
                time.sleep(0.25)
                st.advance()
                logging.getLogger("dedup_batch.apply").info("batch logged")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "\r" in text and "[#" in text and "%" in text
    assert "4/4 batches" in text or " 100%" in text
    assert "batch logged" in text and "apply: done in" in text
    assert "heartbeat" not in text


def test_track_distributed_futures(dask_client):
    buf = io.StringIO()
    configure_logging("json", stream=buf, heartbeat_s=30)
    futs = dask_client.map(lambda x: x * x, range(12), pure=False)
    results = sorted(f.result() for f in track(futs, "square", unit="tasks"))
    assert results == [x * x for x in range(12)]
    end = next(e for e in _json_lines(buf) if e["event"] == "stage_end")
    assert end["stage"] == "square" and end["done"] == 12 and end["total"] == 12


def test_track_failed_task_is_yielded_not_raised(dask_client):
    def maybe_fail(x):
        if x == 3:
            raise ValueError("bad item")
        return x

    futs = dask_client.map(maybe_fail, range(5), pure=False)
    with stage("mixed") as st:
        errors = [f for f in track(futs, st) if f.status == "error"]
        assert st.total == 5 and st.done == 5
    assert len(errors) == 1
    with pytest.raises(ValueError, match="bad item"):
        errors[0].result()


def test_track_thread_futures_advances_an_open_stage():
    with concurrent.futures.ThreadPoolExecutor(2) as pool, stage("thumbs", total=6) as st:
        futs = [pool.submit(time.sleep, 0.01) for _ in range(6)]
        assert len(list(track(futs, st))) == 6
        assert st.done == 6


def test_dashboard_link_logged(dask_client):
    buf = io.StringIO()
    configure_logging("json", stream=buf, progress="off")
    link = log_dashboard(dask_client)  # the fixture's cluster runs without a dashboard
    event = next(e for e in _json_lines(buf) if e["event"] == "dashboard")
    assert event["url"] == link
    assert ("not available" in event["message"]) == (link is None)


def test_secrets_never_logged(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecretvalue123")
    for fmt in ("json", "text"):
        buf = io.StringIO()
        configure_logging(fmt, stream=buf, progress="off")
        register_secrets(
            {
                "key": "AKIAEXAMPLEKEY",
                "secret": "topsecretvalue",
                "client_kwargs": {
                    "endpoint_url": "http://127.0.0.1:9",
                    "aws_session_token": "sessiontok999",
                },
                "anon": False,
            }
        )
        lg = logging.getLogger("dedup_batch.storage")
        lg.info(
            "opening with key=%s secret=%s",
            "AKIAEXAMPLEKEY",
            "topsecretvalue",
            extra={
                "options": {"secret": "topsecretvalue", "region": "eu-west-1"},
                "note": "token sessiontok999 and envsecretvalue123",
            },
        )
        out = buf.getvalue()
        for s in ("AKIAEXAMPLEKEY", "topsecretvalue", "sessiontok999", "envsecretvalue123"):
            assert s not in out, (fmt, out)
        assert "***" in out
        if fmt == "json":
            obj = _json_lines(buf)[-1]
            assert obj["options"] == {"secret": "***", "region": "eu-west-1"}


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="heartbeat"):
        configure_logging("text", heartbeat_s=0)


def test_track_weights_advance_by_items(dask_client):
    futs = dask_client.map(len, [[1] * k for k in (3, 5, 7)], pure=False)
    with stage("thumbs", unit="images") as st:
        assert sorted(f.result() for f in track(futs, st, weights=[3, 5, 7])) == [3, 5, 7]
        assert st.total == 15 and st.done == 15
    with pytest.raises(ValueError, match="2 weights for 3 futures"):
        list(track(futs, "x", weights=[1, 2]))


def test_advance_reaches_the_innermost_stage_only() -> None:
    progress.advance(5)  # no stage running: nothing to advance, no error
    with progress.stage("outer") as outer, progress.stage("inner") as inner:
        assert progress.current() is inner
        progress.advance(2, total=4)
        progress.advance(1, total=99)  # the first total stays
    assert (inner.done, inner.total) == (3, 4)
    assert (outer.done, outer.total) == (0, None)
    assert progress.current() is None
