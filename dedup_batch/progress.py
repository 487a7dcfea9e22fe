"""Stage timing, progress bars, heartbeats and log set-up.

A long job must show that it is alive. The pipeline marks each stage and reports how far it got;
how that is shown depends on where the job runs, which only the CLI decides (through
:func:`configure_logging`):

* on a terminal (text format, stderr is a TTY): one live progress bar for the innermost running
  stage, redrawn in place, with log lines printed above it;
* anywhere else (a pipe, a file, a Kubernetes pod): a one-line heartbeat every ``heartbeat_s``
  seconds for the innermost running stage (stage, done/total, elapsed), so a log reader sees the
  job is alive even while nothing else is logged;
* ``--log-format json``: one JSON object per line on stderr for every event (``stage_start``,
  ``heartbeat``, ``stage_end``, ``stage_failed``, ``dashboard``, plain messages), with the fields
  ``time``, ``level``, ``logger``, ``message``, ``event`` and, where they apply, ``stage``,
  ``done``, ``total``, ``unit``, ``elapsed`` (seconds) and any ``extra=`` fields of the record.

The API the pipeline uses::

    from dedup_batch.progress import stage, track, log_dashboard, StageTimer

    log_dashboard(client)                       # logs the Dask dashboard link, if any

    with stage("apply", total=n_batches, unit="batches") as st:
        for batch in batches:
            ...
            st.advance()                        # or st.advance(k)

    advance(k, total=n)                         # deep inside a stage: the innermost one

    # futures (distributed or concurrent.futures), advanced as each one finishes:
    for fut in track(futures, "thumbnails", unit="batches"):
        result = fut.result()

    timer = StageTimer()                        # per-stage wall times for summary.json
    with timer.stage("cluster") as st:          # same as stage(), also records the time
        ...
    timer.timings                               # {"cluster": 1.234}

:func:`stage` works whether or not logging was configured; a library user who never calls
:func:`configure_logging` gets plain log records and no bar or heartbeat thread.

Secrets never reach the log: :func:`configure_logging` installs a filter that replaces every
registered secret value (:func:`register_secrets`, which the CLI calls with the job's
``storage_options``; the AWS secret environment variables are registered automatically) with
``***`` in messages and fields, and mappings passed as fields are redacted
(:func:`dedup_batch.secrets.redact`: only known non-secret options are shown).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import datetime as _dt
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

from .secrets import MIN_SECRET_LEN, env_secret_values, redact, scrub, secret_values

__all__ = [
    "Stage",
    "StageTimer",
    "configure_logging",
    "log_dashboard",
    "register_secrets",
    "scrub_message",
    "stage",
    "track",
]

log = logging.getLogger("dedup_batch")

#: Default seconds between heartbeat lines when stderr is not a terminal: often enough that a
#: stuck job shows within a minute, rare enough that a day-long job logs < 3000 lines.
HEARTBEAT_S = 30.0
#: Seconds between redraws of a terminal bar (also the tick that keeps elapsed time moving).
BAR_REFRESH_S = 0.2
#: Environment variable that overrides the heartbeat interval (seconds) for the CLI.
HEARTBEAT_ENV = "DEDUP_BATCH_HEARTBEAT_S"

# LogRecord attributes that are not user fields (everything else a record carries came in
# through ``extra=`` and goes into the JSON object).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}


@dataclass
class _Settings:
    """What :func:`configure_logging` decided; read by every stage when it starts."""

    mode: str = "off"  # "bar", "heartbeat" or "off"
    heartbeat_s: float = HEARTBEAT_S
    stream: IO[str] | None = None
    handler: logging.Handler | None = None
    secrets: set[str] = field(default_factory=set)


_settings = _Settings()
_lock = threading.RLock()  # guards the active-stage stack and every write to the stream
_active: list[Stage] = []  # running stages, innermost last: only the innermost one is shown


# -- stages --------------------------------------------------------------------------------------
class Stage:
    """A running stage: a name, a count of work items done and (when known) the total.

    Thread-safe: worker threads may call :meth:`advance` concurrently.
    """

    def __init__(self, name: str, total: int | None = None, unit: str = "items") -> None:
        self.name = name
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()
        self._count_lock = threading.Lock()
        self._last_draw = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since the stage started."""
        return time.monotonic() - self.started

    def advance(self, k: int = 1) -> None:
        """Record ``k`` more items done (and redraw the bar, at most every ``BAR_REFRESH_S``)."""
        with self._count_lock:
            self.done += k
        if _settings.mode == "bar":
            now = time.monotonic()
            if now - self._last_draw >= BAR_REFRESH_S or (self.total and self.done >= self.total):
                self._last_draw = now
                _draw_bar()

    def set_total(self, total: int | None) -> None:
        """Set or change the total once it is known."""
        self.total = total

    def fields(self) -> dict[str, Any]:
        """The structured fields of this stage for a log record."""
        return {
            "stage": self.name,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "elapsed": round(self.elapsed, 3),
        }

    def line(self) -> str:
        """One human line: ``apply: 350/1000 batches (35%), elapsed 12.0s``."""
        if self.total:
            pct = 100.0 * self.done / self.total
            return (
                f"{self.name}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"elapsed {self.elapsed:.1f}s"
            )
        return f"{self.name}: {self.done} {self.unit}, elapsed {self.elapsed:.1f}s"

    def __repr__(self) -> str:
        return f"Stage({self.line()!r})"


@contextmanager
def stage(name: str, total: int | None = None, *, unit: str = "items") -> Iterator[Stage]:
    """Mark a pipeline stage: log its start and end, show progress while it runs.

    Parameters
    ----------
    name : str
        Stage name (``load``, ``cluster``, ``apply``...), used in every line and JSON event.
    total : int, optional
        Number of work items, if known (can be set later with :meth:`Stage.set_total`).
    unit : str
        What an item is, for display (``files``, ``batches``, ``images``).

    Yields
    ------
    Stage
        Call ``advance(k)`` as work completes.
    """
    st = Stage(name, total, unit)
    log.info("%s: started", name, extra={"event": "stage_start", **st.fields()})
    ticker = _Ticker(st) if _settings.mode != "off" else None
    with _lock:
        _active.append(st)
    if ticker is not None:
        ticker.start()
    ok = False
    try:
        yield st
        ok = True
    finally:
        if ticker is not None:
            ticker.stop()
        with _lock:
            if _settings.mode == "bar":
                _clear_bar()
            if st in _active:
                _active.remove(st)
        if ok:
            log.info(
                "%s: done in %.2fs", name, st.elapsed, extra={"event": "stage_end", **st.fields()}
            )
        else:
            log.error(
                "%s: failed after %.2fs (%s)",
                name,
                st.elapsed,
                st.line(),
                extra={"event": "stage_failed", **st.fields()},
            )
        if _settings.mode == "bar":
            _draw_bar()  # the enclosing stage's bar, if any


def current() -> Stage | None:
    """The innermost running stage, or ``None``."""
    with _lock:
        return _active[-1] if _active else None


def advance(k: int = 1, *, total: int | None = None) -> None:
    """Advance the innermost running stage by ``k`` (setting its total first, when given).

    For code deep inside a stage (apply's batch loop, the clustering tiles) that should report
    progress without being handed the :class:`Stage`; a no-op when no stage is running.
    """
    st = current()
    if st is None:
        return
    if total is not None and st.total is None:
        st.set_total(total)
    if k:
        st.advance(k)


class StageTimer:
    """Collects per-stage wall times (seconds) for ``summary.json``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, total: int | None = None, *, unit: str = "items") -> Iterator[Stage]:
        """Like :func:`stage`, and records the stage's wall time in :attr:`timings`."""
        t0 = time.perf_counter()
        try:
            with stage(name, total, unit=unit) as st:
                yield st
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 4)


def track(
    futures: Iterable[Any],
    stage_or_name: Stage | str,
    *,
    unit: str = "tasks",
    weights: Sequence[int] | None = None,
) -> Iterator[Any]:
    """Yield ``futures`` as they finish, advancing a stage for each.

    Parameters
    ----------
    futures : iterable of ``distributed.Future`` or ``concurrent.futures.Future``
        All of one kind. Distributed futures are waited on with ``distributed.as_completed``
        (the scheduler tells us as each finishes: works with any cluster, unlike
        ``dask.diagnostics.ProgressBar``, which only sees the local schedulers).
    stage_or_name : Stage or str
        A running stage to advance, or the name of a new stage opened for these futures.
    unit : str
        Display unit when a new stage is opened.
    weights : sequence of int, optional
        How many items each future stands for (e.g. images per batch), in the order of
        ``futures``; the stage advances by that much and its total is their sum. Default 1 each.

    Yields
    ------
    future
        Each future once it is done, failed ones included (``.result()`` raises their error).
    """
    futs = list(futures)
    if weights is None:
        weights = [1] * len(futs)
    if len(weights) != len(futs):
        raise ValueError(f"track: {len(weights)} weights for {len(futs)} futures")
    if isinstance(stage_or_name, str):
        with stage(stage_or_name, total=int(sum(weights)), unit=unit) as st:
            yield from _as_completed(futs, weights, st)
    else:
        if stage_or_name.total is None:
            stage_or_name.set_total(int(sum(weights)))
        yield from _as_completed(futs, weights, stage_or_name)


def _as_completed(futs: list[Any], weights: Sequence[int], st: Stage) -> Iterator[Any]:
    if not futs:
        return
    # Position by identity: distributed futures of equal keys compare equal.
    weight_of = {id(f): int(w) for f, w in zip(futs, weights, strict=True)}
    if all(isinstance(f, concurrent.futures.Future) for f in futs):
        done_iter: Iterable[Any] = concurrent.futures.as_completed(futs)
    else:
        from distributed import as_completed

        # raise_errors=False: a failed task is yielded like any other and raises at .result(),
        # where the caller can handle it; the bar still counts it as finished.
        done_iter = as_completed(futs, raise_errors=False)
    for fut in done_iter:
        st.advance(weight_of.get(id(fut), 1))
        yield fut


def log_dashboard(client: Any) -> str | None:
    """Log the Dask dashboard link of ``client`` (once, at start); return it, or ``None``."""
    try:
        link = client.dashboard_link
    except Exception:  # no dashboard (dashboard_address=None) or bokeh missing
        link = None
    if link:
        log.info("dask dashboard: %s", link, extra={"event": "dashboard", "url": link})
    else:
        log.info("dask dashboard: not available", extra={"event": "dashboard", "url": None})
    return link or None


# -- heartbeats and bars -------------------------------------------------------------------------
class _Ticker:
    """A daemon thread that, while its stage is the innermost one, redraws the bar or logs a
    heartbeat at a fixed interval, so that progress shows even when no item completes."""

    def __init__(self, st: Stage) -> None:
        self.st = st
        self.mode = _settings.mode
        self.interval = BAR_REFRESH_S if self.mode == "bar" else _settings.heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress-{st.name}", daemon=True)

    def start(self) -> None:
        _tickers.add(self)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        _tickers.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                with _lock:
                    innermost = bool(_active) and _active[-1] is self.st
                if not innermost:
                    continue
                if self.mode == "bar":
                    _draw_bar()
                else:
                    log.info("%s", self.st.line(), extra={"event": "heartbeat", **self.st.fields()})
        except BaseException:
            # At interpreter exit a daemon thread can find logging or the stream half torn
            # down: a heartbeat is not worth a traceback on the user's terminal then.
            if self._stop.is_set() or sys.is_finalizing():
                return
            raise


#: Tickers still running, stopped at exit (a stage left open in an abandoned generator).
_tickers: weakref.WeakSet[_Ticker] = weakref.WeakSet()


@atexit.register
def _stop_tickers() -> None:
    for t in list(_tickers):
        t._stop.set()


_bar_shown = False


def _bar_text(st: Stage, width: int) -> str:
    head = f"{st.name:<10.10} "
    tail = f" {st.done}/{st.total} {st.unit}" if st.total else f" {st.done} {st.unit}"
    tail += f"  {st.elapsed:6.1f}s"
    if st.total:
        frac = min(1.0, st.done / st.total)
        if 0 < st.done < st.total:
            tail += f"  eta {st.elapsed * (st.total - st.done) / st.done:5.0f}s"
        slots = max(10, width - len(head) - len(tail) - 8)
        filled = int(frac * slots)
        bar = "[" + "#" * filled + "-" * (slots - filled) + f"] {100 * frac:3.0f}%"
    else:
        spin = "|/-\\"[int(st.elapsed / BAR_REFRESH_S) % 4]
        bar = f"[{spin}]"
    return (head + bar + tail)[: width - 1]


def _draw_bar() -> None:
    global _bar_shown
    stream = _settings.stream
    with _lock:
        if stream is None or not _active:
            return
        try:
            width = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 100
        stream.write("\r" + _bar_text(_active[-1], width) + "\x1b[K")
        stream.flush()
        _bar_shown = True


def _clear_bar() -> None:
    global _bar_shown
    stream = _settings.stream
    with _lock:
        if _bar_shown and stream is not None:
            stream.write("\r\x1b[K")
            stream.flush()
        _bar_shown = False


# -- logging set-up ------------------------------------------------------------------------------
def register_secrets(options: Mapping[str, Any] | Iterable[str] | None) -> None:
    """Register secret values to scrub from every log line.

    Parameters
    ----------
    options : mapping or iterable of str
        A ``storage_options`` mapping (every value :func:`dedup_batch.secrets.redact` hides,
        and the userinfo of endpoint URLs, are registered), or the secret strings themselves.
    """
    if options is None:
        return
    is_map = isinstance(options, Mapping)
    values = secret_values(options) if is_map else [str(v) for v in options]
    with _lock:
        _settings.secrets.update(v for v in values if len(v) >= MIN_SECRET_LEN)


def scrub_message(text: str) -> str:
    """``text`` with every registered secret (and the secret environment variables) hidden.

    For messages printed outside logging, such as the CLI's ``error:`` line.
    """
    with _lock:
        registered = [*_settings.secrets, *env_secret_values()]
    return scrub(text, registered)


def _scrub(text: str) -> str:
    return scrub(text, _settings.secrets)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, Mapping):
        return {k: _scrub_value(v) for k, v in redact(value).items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


class _SecretFilter(logging.Filter):
    """Replaces registered secrets in the message and fields of every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _settings.secrets or any(isinstance(v, Mapping) for v in _extras(record).values()):
            record.msg = _scrub(record.getMessage())
            record.args = None
            for k, v in _extras(record).items():
                setattr(record, k, _scrub_value(v))
            # Text formatters print exc_text (formatted once, here) verbatim: scrub it too.
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = _scrub(record.exc_text)
            if record.stack_info:
                record.stack_info = _scrub(record.stack_info)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    ``event`` (``"log"`` for plain messages) and the record's ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _scrub(record.getMessage()),
            "event": "log",
        }
        for k, v in _extras(record).items():
            obj[k] = _scrub_value(v)
        if record.exc_info:
            obj["exception"] = _scrub(self.formatException(record.exc_info))
        return json.dumps(obj, default=str, ensure_ascii=False)


class _BarAwareHandler(logging.StreamHandler):
    """A stream handler that clears the terminal bar before a line and redraws it after."""

    def emit(self, record: logging.LogRecord) -> None:
        with _lock:
            if _settings.mode == "bar" and _bar_shown:
                _clear_bar()
                super().emit(record)
                _draw_bar()
            else:
                super().emit(record)


def configure_logging(
    fmt: str = "text",
    level: int | str = logging.INFO,
    *,
    stream: IO[str] | None = None,
    progress: str = "auto",
    heartbeat_s: float | None = None,
) -> None:
    """Send the package's log records to stderr and choose how progress is shown.

    Only the CLI calls this, never the library.

    Parameters
    ----------
    fmt : {"text", "json"}
        ``text``: ``HH:MM:SS LEVEL message`` lines; ``json``: one JSON object per line.
    level : int or str
        Logging level (``logging.INFO`` or ``"INFO"``).
    stream : file, optional
        Where to write (default ``sys.stderr``).
    progress : {"auto", "bar", "heartbeat", "off"}
        ``auto``: a bar when ``fmt`` is ``text`` and ``stream`` is a terminal, heartbeats
        otherwise.
    heartbeat_s : float, optional
        Seconds between heartbeats (default ``$DEDUP_BATCH_HEARTBEAT_S`` or 30).
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    if progress not in ("auto", "bar", "heartbeat", "off"):
        raise ValueError(f"progress must be auto, bar, heartbeat or off, got {progress!r}")
    stream = stream if stream is not None else sys.stderr
    if heartbeat_s is None:
        heartbeat_s = float(os.environ.get(HEARTBEAT_ENV) or HEARTBEAT_S)
    if heartbeat_s <= 0:
        raise ValueError(f"heartbeat interval must be > 0 seconds, got {heartbeat_s}")
    if progress == "auto":
        tty = bool(getattr(stream, "isatty", lambda: False)())
        progress = "bar" if (fmt == "text" and tty) else "heartbeat"
    if fmt == "json" and progress == "bar":
        progress = "heartbeat"  # a bar would corrupt the one-object-per-line stream
    handler = _BarAwareHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(_SecretFilter())
    register_secrets(env_secret_values())
    root = logging.getLogger("dedup_batch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    with _lock:
        _settings.mode = progress
        _settings.heartbeat_s = heartbeat_s
        _settings.stream = stream
        _settings.handler = handler
