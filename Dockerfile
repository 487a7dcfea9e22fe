# One image for the dedup-batch job, the Dask scheduler and the Dask workers.
#
#   docker build -t dedup-batch:0.1.0 .
#   docker run --rm dedup-batch:0.1.0 demo
#
# Base image: the Python minor version and the Debian release are pinned by the tag
# (python:3.11-slim-bookworm), not by digest, so that a rebuild picks up CPython patch releases
# and Debian security fixes while the ABI the wheels are built for (CPython 3.11, glibc of
# bookworm) stays the same. For a bit-for-bit reproducible build pin the digest at build time:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
# Both stages must use the same image: the venv's interpreter is a link to the base's python.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: install the package and its runtime extras into a venv ------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pdqhash (the embed extra's PDQ hasher) ships only as source: the builder needs a C++
# compiler. It stays in this stage; the final image gets the built venv, no build tools.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Only what the wheel is built from (see .dockerignore): no tests, no data, no secrets.
COPY pyproject.toml ./
COPY dedup_batch ./dedup_batch
# Extras: s3 (s3fs, for s3:// roots and outputs), report (pillow + matplotlib, for
# report.html), embed (pdqhash, built from source with the compiler above), embed-onnx
# (onnxruntime, CPU wheel) and embed-heif (pillow-heif: HEIC photos). Not embed-torch: torch
# and its model zoos add about a gigabyte; install them in an image built from this one. The
# byte code is compiled now because the pod's root filesystem is read-only.
RUN pip install --no-cache-dir "./[s3,report,embed,embed-onnx,embed-heif]" \
    && python -m compileall -q /opt/venv/lib

# ---- final: the venv, tini and an unprivileged user; no build tools ---------------------------
FROM ${PYTHON_IMAGE}

# tini as PID 1 forwards SIGTERM (pod deletion, activeDeadlineSeconds) to dedup-batch and
# reaps the Dask LocalCluster's worker processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A numeric, non-root user (Kubernetes' runAsNonRoot can only check a numeric USER).
# /scratch is its HOME and working directory; the chart mounts an emptyDir there, because the
# root filesystem is read-only in the pod.
RUN groupadd --system --gid 10001 dedup \
    && useradd --system --uid 10001 --gid 10001 --home-dir /scratch --no-create-home \
       --shell /usr/sbin/nologin dedup \
    && mkdir -p /scratch \
    && chown 10001:10001 /scratch

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/scratch \
    TMPDIR=/tmp \
    DASK_TEMPORARY_DIRECTORY=/scratch/dask \
    MPLCONFIGDIR=/scratch/.config/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /scratch
USER 10001:10001

# Stopping the container (pod deletion, activeDeadlineSeconds) sends SIGINT through tini: the
# CLI treats it as an interruption, closes its Dask cluster and exits 130 ("re-run to resume");
# `dask scheduler` and `dask worker` shut down cleanly on it too.
STOPSIGNAL SIGINT

ENTRYPOINT ["/usr/bin/tini", "--", "dedup-batch"]
CMD ["--help"]
