"""The Helm chart, checked offline: lint, render, schema, and the Kubernetes API schemas.

No cluster is involved. The chart is rendered in-process with helm-python-sdk (Helm's own Go
template engine and JSON-schema validator), and every rendered object is validated with
kubernetes-validate against each Kubernetes minor version from 1.29 to the newest it ships, in
strict mode (unknown fields are errors). What these checks cannot see (admission controllers,
RBAC, IRSA webhooks, image pulls, NetworkPolicy enforcement) is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from dedup_batch.config import KEEP_POLICIES, LOG_FORMATS, METRICS, MODES, JobSpec

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "dedup-batch"
EXAMPLE_SPEC = ROOT / "jobs" / "s3-bucket.yaml"
RELEASE, NAMESPACE = "dedup", "images"
FULLNAME = f"{RELEASE}-dedup-batch"
SPEC_PATH = "/etc/dedup-batch/job.yaml"
UID = 10001


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


#: Every Kubernetes minor version the chart must be valid for: 1.29 (the chart's kubeVersion
#: floor) up to the newest schema kubernetes-validate ships, discovered from the package.
K8S_VERSIONS = sorted({v for v in all_versions() if _minor(v) >= (1, 29)}, key=_minor)

MIN_SPEC = {"features": ["s3://bkt/features/*.parquet"], "root": "s3://bkt/images/"}


def _example_spec() -> dict[str, Any]:
    with open(EXAMPLE_SPEC, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


#: Value sets covering the three Dask modes and every optional branch of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "local-minimal": {"jobSpec": MIN_SPEC},
    "local-example-irsa": {
        "jobSpec": _example_spec(),
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/dedup"}
        },
        "s3": {"region": "eu-west-1"},
    },
    "local-secret-envfrom": {
        "jobSpec": {**MIN_SPEC, "out": "s3://bkt/runs/1/", "n_workers": 2},
        "s3": {
            "existingSecret": "s3-creds",
            "endpointUrl": "http://minio.storage.svc:9000",
            "requestChecksumCalculation": "when_required",
        },
        "job": {"ttlSecondsAfterFinished": None, "backoffLimit": 0},
        "image": {"repository": "registry.example.com/dedup-batch", "tag": "0.1.0-rc1"},
    },
    "external": {
        "jobSpec": MIN_SPEC,
        "dask": {"mode": "external", "external": {"address": "tcp://dask-scheduler.dask.svc:8786"}},
        "s3": {
            "existingSecret": "s3-creds",
            "secretEnv": {"AWS_ACCESS_KEY_ID": "access-key", "AWS_SECRET_ACCESS_KEY": "secret-key"},
        },
    },
    "chart": {"jobSpec": MIN_SPEC, "dask": {"mode": "chart"}},
    "chart-full-apply": {
        "fullnameOverride": "dd",
        "jobSpec": {
            **MIN_SPEC,
            "mode": "apply",
            "trash": "s3://bkt/trash/",
            "max_delete": 123456789,
            "storage_options": {"requester_pays": True, "client_kwargs": {"region_name": "eu"}},
        },
        "image": {"digest": "sha256:" + "ab" * 32, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "serviceAccount": {"create": False, "name": "existing-sa"},
        "s3": {
            "existingSecret": "s3-creds",
            "secretEnv": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"},
            "retryMode": "adaptive",
        },
        "dask": {
            "mode": "chart",
            "scheduler": {"port": 8800, "waitSeconds": 60},
            "worker": {"replicas": 5, "nthreads": 4, "memoryLimit": "6GiB", "port": 9100},
        },
        "extraEnv": [
            {"name": "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "value": "60s"},
            {
                "name": "EXTRA_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "other-secret", "key": "token"}},
            },
        ],
        "nodeSelector": {"node.kubernetes.io/pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "arch", "operator": "In", "values": ["x"]}]}
                    ]
                }
            }
        },
        "priorityClassName": "batch-low",
        "scratch": {"sizeLimit": "50Gi", "tmpSizeLimit": "2Gi"},
        "job": {"podLabels": {"team": "ml"}, "podAnnotations": {"note": "x"}},
    },
}


# ----------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def _render(chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Rendered objects (all templates) and NOTES.txt."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs, notes = [], ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
        elif path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, notes


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, tuple[list[dict[str, Any]], str]]:
    return {name: _render(chart, values) for name, values in VALUE_SETS.items()}


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Job", "Deployment")
    ]


def _job_spec_from_configmap(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return yaml.safe_load(cm["data"]["job.yaml"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------------------
# lint, render, API schemas
# ----------------------------------------------------------------------------------------
def test_kubernetes_versions_discovered() -> None:
    assert K8S_VERSIONS[0].startswith("1.29.")
    assert len(K8S_VERSIONS) >= 5, K8S_VERSIONS


@pytest.mark.parametrize("name", [None, *VALUE_SETS])
def test_lint_strict(name: str | None) -> None:
    values = None if name is None else VALUE_SETS[name]
    report = helm_python.lint(CHART, values, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_valid_for_every_kubernetes_version(rendered, name: str) -> None:
    docs, _ = rendered[name]
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {doc['kind']} {doc['metadata']['name']} invalid for "
                    f"{version} at {where}: {exc.message}"
                )


def test_kinds_per_mode(rendered) -> None:
    def kinds(name: str) -> list[str]:
        return sorted(d["kind"] for d in rendered[name][0])

    local = ["ConfigMap", "Job", "NetworkPolicy", "ServiceAccount"]
    assert kinds("local-minimal") == local
    assert kinds("external") == local
    assert kinds("chart") == sorted(
        [*local, "Deployment", "Deployment", "Service", "NetworkPolicy", "NetworkPolicy"]
    )
    # serviceAccount.create false: no ServiceAccount, the pods use the named one
    assert "ServiceAccount" not in kinds("chart-full-apply")
    for _, pod in _pod_specs(rendered["chart-full-apply"][0]):
        assert pod["serviceAccountName"] == "existing-sa"


def test_standard_labels(rendered) -> None:
    for name, (docs, _) in rendered.items():
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "dedup-batch", name
            assert labels["app.kubernetes.io/instance"] == RELEASE
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["app.kubernetes.io/version"] == "0.1.0"
            assert labels["helm.sh/chart"] == "dedup-batch-0.1.0"
            assert doc["metadata"]["namespace"] == NAMESPACE


# ----------------------------------------------------------------------------------------
# the Job
# ----------------------------------------------------------------------------------------
def test_job_retry_policy(rendered) -> None:
    job = _one(rendered["local-minimal"][0], "Job")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (2, 21600)
    assert spec["ttlSecondsAfterFinished"] == 604800
    assert spec["completions"] == spec["parallelism"] == 1
    ignore, fail, count = spec["podFailurePolicy"]["rules"]
    # node drains, preemption, eviction: not counted against backoffLimit
    assert ignore == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    # exit 2 (bad config/input/storage) and 3 (safety limit): fail the Job at once
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "dedup-batch", "operator": "In", "values": [2, 3]},
    }
    # the others (1 unexpected, 4 partly not deleted) are retried, resuming from the journal
    assert count == {
        "action": "Count",
        "onExitCodes": {"containerName": "dedup-batch", "operator": "NotIn", "values": [0, 2, 3]},
    }
    names = [c["name"] for c in spec["template"]["spec"]["containers"]]
    assert names == ["dedup-batch"]

    other = _one(rendered["local-secret-envfrom"][0], "Job")["spec"]
    assert "ttlSecondsAfterFinished" not in other  # null: kept until uninstall
    assert other["backoffLimit"] == 0


def test_job_runs_the_configmap_spec(rendered) -> None:
    for name, (docs, _) in rendered.items():
        job = _one(docs, "Job")
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["run", "--config", SPEC_PATH], name
        mount = next(m for m in container["volumeMounts"] if m["name"] == "job-spec")
        assert mount["readOnly"] is True
        assert os.path.join(mount["mountPath"], "job.yaml") == SPEC_PATH
        volume = next(v for v in pod["volumes"] if v["name"] == "job-spec")
        cm = _one(docs, "ConfigMap")
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert list(cm["data"]) == ["job.yaml"]


def test_default_mode_is_plan(rendered) -> None:
    spec = _job_spec_from_configmap(rendered["local-minimal"][0])
    assert spec["mode"] == "plan"
    assert JobSpec.from_mapping(spec).mode == "plan"
    assert spec["log_format"] == "json"
    assert "dry run" in rendered["local-minimal"][1]
    # deleting needs the explicit `mode: apply`; the chart adds no flag that could override it
    applied = _job_spec_from_configmap(rendered["chart-full-apply"][0])
    assert applied["mode"] == "apply"
    assert "WILL BE DELETED" in rendered["chart-full-apply"][1]
    for name, (docs, _) in rendered.items():
        args = _one(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert not any(a in ("--apply", "--mode") for a in args), name


def test_required_job_spec_keys(chart) -> None:
    for missing in ("features", "root"):
        spec = {k: v for k, v in MIN_SPEC.items() if k != missing}
        with pytest.raises(helm_python.HelmError, match=f"jobSpec.{missing} is required"):
            chart.render({"jobSpec": spec}, name=RELEASE, namespace=NAMESPACE)


# ----------------------------------------------------------------------------------------
# security
# ----------------------------------------------------------------------------------------
def test_security_context_hardened(rendered) -> None:
    for name, (docs, _) in rendered.items():
        for obj, pod in _pod_specs(docs):
            where = f"{name}/{obj}"
            psc = pod["securityContext"]
            assert psc["runAsNonRoot"] is True, where
            assert psc["runAsUser"] == UID and psc["runAsGroup"] == UID, where
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["automountServiceAccountToken"] is False, where
            assert "hostNetwork" not in pod and "hostPID" not in pod, where
            empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
            for c in pod.get("initContainers", []) + pod["containers"]:
                csc = c["securityContext"]
                assert csc["runAsNonRoot"] is True and csc["runAsUser"] == UID, where
                assert csc["readOnlyRootFilesystem"] is True, where
                assert csc["allowPrivilegeEscalation"] is False, where
                assert csc["privileged"] is False, where
                assert csc["capabilities"] == {"drop": ["ALL"]}, where
                assert csc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for c in pod["containers"]:
                # the read-only root needs writable scratch, HOME, tmp and dask's local directory
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert mounts["/scratch"] in empty_dirs and mounts["/tmp"] in empty_dirs, where
                env = _env(c)
                assert env["HOME"]["value"] == "/scratch", where
                assert env["DASK_TEMPORARY_DIRECTORY"]["value"].startswith("/scratch/"), where
                assert env["TMPDIR"]["value"] == "/tmp", where
                assert "resources" in c and c["resources"]["limits"]["memory"], where
    full = _pod_specs(rendered["chart-full-apply"][0])
    for _, pod in full:
        scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
        assert scratch["emptyDir"]["sizeLimit"] == "50Gi"


#: Environment variable names that carry credentials: only ever from a Secret reference.
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASS|CREDENTIAL", re.IGNORECASE)


def test_no_secret_material_in_rendered_objects(rendered) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                assert not _SECRET_NAME.search(k), f"{path}.{k} in the ConfigMap"
                walk(v, f"{path}.{k}")

    for name, (docs, _) in rendered.items():
        assert "Secret" not in {d["kind"] for d in docs}, name
        for doc in docs:
            # only the ConfigMap carries data, and its spec has no credential-like key
            assert "stringData" not in doc and ("data" not in doc or doc["kind"] == "ConfigMap")
        spec = _job_spec_from_configmap(docs)
        walk(spec.get("storage_options", {}), f"{name}: storage_options")
        for _, pod in _pod_specs(docs):
            for c in pod.get("initContainers", []) + pod["containers"]:
                for env in c.get("env", []):
                    if _SECRET_NAME.search(env["name"]):
                        assert "value" not in env, f"{name}: {env['name']} in plain text"
                        ref = env["valueFrom"]["secretKeyRef"]
                        assert ref["name"] in ("s3-creds", "other-secret")
                for source in c.get("envFrom", []):
                    assert set(source) == {"secretRef"}


def test_s3_credentials_only_from_the_existing_secret(rendered) -> None:
    # envFrom: the whole Secret, on the job and the workers (they read and delete), never on
    # the scheduler
    docs = rendered["local-secret-envfrom"][0]
    (job_c,) = _one(docs, "Job")["spec"]["template"]["spec"]["containers"]
    assert job_c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = _env(job_c)
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc:9000"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"]["value"] == "when_required"
    assert env["AWS_RETRY_MODE"]["value"] == "standard"
    # secretEnv: named keys of the Secret
    docs = rendered["chart-full-apply"][0]
    pods = dict(_pod_specs(docs))
    for obj in ("dd", "dd-worker"):
        (c,) = pods[obj]["containers"]
        env = _env(c)
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "s3-creds",
            "key": "secret",
        }
        assert env["AWS_RETRY_MODE"]["value"] == "adaptive"
        assert "envFrom" not in c
    (sched,) = pods["dd-scheduler"]["containers"]
    assert not any(e["name"].startswith("AWS_") for e in sched.get("env", []))
    assert "envFrom" not in sched
    # IRSA: the ServiceAccount carries the role annotation
    sa = _one(rendered["local-example-irsa"][0], "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/dedup")
    assert sa["automountServiceAccountToken"] is False


# ----------------------------------------------------------------------------------------
# Dask modes
# ----------------------------------------------------------------------------------------
def test_local_and_external_modes(rendered) -> None:
    (c,) = _one(rendered["local-minimal"][0], "Job")["spec"]["template"]["spec"]["containers"]
    assert "DASK_SCHEDULER_ADDRESS" not in _env(c)  # LocalCluster in the pod
    job = _one(rendered["external"][0], "Job")["spec"]["template"]["spec"]
    (c,) = job["containers"]
    assert _env(c)["DASK_SCHEDULER_ADDRESS"]["value"] == "tcp://dask-scheduler.dask.svc:8786"
    assert "initContainers" not in job


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists expressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def test_chart_mode_scheduler_reachable_only_from_the_release(rendered) -> None:
    docs = rendered["chart-full-apply"][0]
    pods = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Job", "Deployment")
    }
    assert set(pods) == {"job", "scheduler", "worker"}
    labels = {k: v["metadata"]["labels"] for k, v in pods.items()}
    # another release's job in the same namespace must not get in
    stranger = {**labels["job"], "app.kubernetes.io/instance": "other"}

    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"dd-job", "dd-scheduler", "dd-worker"}

    def allowed(policy: dict[str, Any], src: dict[str, str]) -> list[int]:
        ports = []
        for rule in policy["ingress"]:
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, "no namespaceSelector/ipBlock peers"
                if _selects(peer["podSelector"], src):
                    ports += [p["port"] for p in rule["ports"]]
        return sorted(ports)

    sched = policies["dd-scheduler"]
    assert sched["policyTypes"] == ["Ingress"]
    assert _selects(sched["podSelector"], labels["scheduler"])
    assert not _selects(sched["podSelector"], labels["worker"])
    assert allowed(sched, labels["job"]) == [8800]
    assert allowed(sched, labels["worker"]) == [8800]
    assert allowed(sched, labels["scheduler"]) == []
    assert allowed(sched, stranger) == []

    worker = policies["dd-worker"]
    assert _selects(worker["podSelector"], labels["worker"])
    for src in ("job", "scheduler", "worker"):
        assert allowed(worker, labels[src]) == [9001, 9100]
    assert allowed(worker, stranger) == []

    job = policies["dd-job"]
    assert _selects(job["podSelector"], labels["job"]) and job["ingress"] == []

    # the scheduler serves one port (no dashboard), through a ClusterIP Service only
    svc = _one(docs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8800]
    assert _selects({"matchLabels": svc["spec"]["selector"]}, labels["scheduler"])
    (sc,) = pods["scheduler"]["spec"]["containers"]
    assert "--no-dashboard" in sc["args"]
    assert [p["containerPort"] for p in sc["ports"]] == [8800]
    (wc,) = pods["worker"]["spec"]["containers"]
    assert "--no-dashboard" in wc["args"]
    assert wc["args"][0] == f"tcp://dd-scheduler.{NAMESPACE}.svc:8800"
    assert wc["args"][wc["args"].index("--worker-port") + 1] == "9100"
    assert _one(docs, "Deployment", "dd-worker")["spec"]["replicas"] == 5
    # the job talks to the chart's scheduler, after waiting for it
    job_pod = pods["job"]["spec"]
    assert _env(job_pod["containers"][0])["DASK_SCHEDULER_ADDRESS"]["value"] == wc["args"][0]
    (init,) = job_pod["initContainers"]
    assert init["command"][-3:] == [f"dd-scheduler.{NAMESPACE}.svc", "8800", "60"]


def test_wait_for_scheduler_script_runs(rendered, tmp_path) -> None:
    # The init container's script is real Python: run it against a closed loopback port with a
    # short wait, and against a listening one.
    import socket

    pod = _one(rendered["chart"][0], "Job")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["python", "-c"]
    script = init["command"][2]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        ok = subprocess.run(
            [sys.executable, "-c", script, "127.0.0.1", str(port), "5"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-c", script, "127.0.0.1", str(port), "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "not reachable" in bad.stderr


# ----------------------------------------------------------------------------------------
# values schema
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALUE_SETS)
def test_schema_accepts_the_value_sets(chart, name: str) -> None:
    chart.validate_schema(VALUE_SETS[name])


def _with(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    values = copy.deepcopy(base if base is not None else {"jobSpec": MIN_SPEC})
    node = values
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return values


BAD_VALUES = {
    "unknown top-level key": (_with("replicaCount", 2), "replicaCount"),
    "unknown nested key": (_with("job.backofLimit", 3), "backofLimit"),
    "plaintext s3 secret key": (_with("s3.secretAccessKey", "wJalrXUtnFEMI"), "secretAccessKey"),
    "plaintext s3 access key": (_with("s3.accessKeyId", "AKIAIOSFODNN7"), "accessKeyId"),
    "storage_options key/secret": (
        _with("jobSpec.storage_options", {"key": "AKIA", "secret": "wJalr"}),
        "'secret'",
    ),
    "storage_options nested secret": (
        _with("jobSpec.storage_options", {"client_kwargs": {"aws_secret_access_key": "x"}}),
        "aws_secret_access_key",
    ),
    "storage_options token": (_with("jobSpec.storage_options", {"token": "x"}), "'token'"),
    "plaintext credential in extraEnv": (
        _with("extraEnv", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]),
        "extraEnv",
    ),
    "userinfo in the endpoint": (_with("s3.endpointUrl", "https://u:p@minio:9000"), "endpointUrl"),
    "secretEnv without a Secret": (
        _with("s3.secretEnv", {"AWS_ACCESS_KEY_ID": "id"}),
        "existingSecret",
    ),
    "secretEnv for another variable": (
        _with("s3", {"existingSecret": "s", "secretEnv": {"PATH": "p"}}),
        "PATH",
    ),
    "negative deadline": (_with("job.activeDeadlineSeconds", -1), "activeDeadlineSeconds"),
    "zero deadline": (_with("job.activeDeadlineSeconds", 0), "activeDeadlineSeconds"),
    "negative backoffLimit": (_with("job.backoffLimit", -1), "backoffLimit"),
    "negative ttl": (_with("job.ttlSecondsAfterFinished", -5), "ttlSecondsAfterFinished"),
    "string backoffLimit": (_with("job.backoffLimit", "3"), "backoffLimit"),
    "string replicas": (_with("dask.worker.replicas", "two"), "replicas"),
    "float nthreads": (_with("dask.worker.nthreads", 1.5), "nthreads"),
    "bad quantity": (_with("job.resources", {"limits": {"memory": "lots"}}), "memory"),
    "privileged port": (_with("dask.scheduler.port", 80), "port"),
    "unknown dask mode": (_with("dask.mode", "kubernetes"), "mode"),
    "external without address": (_with("dask.mode", "external"), "address"),
    "bad scheduler address": (
        _with("dask", {"mode": "external", "external": {"address": "dask:8786"}}),
        "address",
    ),
    "jobSpec unknown key": (_with("jobSpec.epsilon", 0.1), "epsilon"),
    "jobSpec scheduler (dask.mode sets it)": (
        _with("jobSpec.scheduler", "tcp://x:8786"),
        "scheduler",
    ),
    "jobSpec bad mode": (_with("jobSpec.mode", "delete"), "mode"),
    "jobSpec string eps": (_with("jobSpec.eps", "small"), "eps"),
    "jobSpec negative eps": (_with("jobSpec.eps", -0.1), "eps"),
    "jobSpec features not paths": (_with("jobSpec.features", 5), "features"),
    "jobSpec batch_size over S3 limit": (_with("jobSpec.batch_size", 5000), "batch_size"),
    "jobSpec fraction over 1": (_with("jobSpec.max_delete_fraction", 1.5), "max_delete_fraction"),
    "image digest not sha256": (_with("image.digest", "latest"), "digest"),
    "bad pull policy": (_with("image.pullPolicy", "Sometimes"), "pullPolicy"),
    "env with value and valueFrom missing": (_with("extraEnv", [{"name": "A"}]), "extraEnv"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_schema_rejects_bad_values(chart, case: str) -> None:
    values, mentioned = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError) as excinfo:
        chart.validate_schema(values)
    assert mentioned in str(excinfo.value), str(excinfo.value)
    # an install renders through the same schema, so it is refused too
    with pytest.raises(helm_python.HelmError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_refuses_clashing_ports(chart) -> None:
    values = _with("dask", {"mode": "chart", "worker": {"port": 9000, "nannyPort": 9000}})
    with pytest.raises(helm_python.HelmError, match="three different ports"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def _schema() -> dict[str, Any]:
    with open(CHART / "values.schema.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_schema_job_spec_matches_the_config_module() -> None:
    props = _schema()["properties"]["jobSpec"]["properties"]
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    # every JobSpec field but `scheduler` (dask.mode decides it), and nothing else
    assert set(props) == fields - {"scheduler"}
    assert props["keep"]["anyOf"][0]["enum"] == list(KEEP_POLICIES)
    keys_pattern = re.compile(props["keep"]["anyOf"][1]["pattern"])
    for spec in ("-pixels,copy,mtime,-size,path", "centroid,path", "size"):
        JobSpec(keep=spec).validate()  # what the schema lets through, the job accepts
        assert keys_pattern.match(spec)
    assert not keys_pattern.match("pixels,centroid")
    assert props["metric"]["enum"] == list(METRICS)
    assert props["mode"]["enum"] == list(MODES)
    assert props["log_format"]["enum"] == list(LOG_FORMATS)


def test_schema_forbids_unknown_keys_everywhere() -> None:
    """Every object schema with named properties is closed (additionalProperties false)."""
    open_objects = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    schema = _schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    walk(schema, "#")
    # `if`/`then` fragments only add constraints to closed objects
    assert [p for p in open_objects if "/if" not in p and "/then" not in p] == []


def test_every_values_key_is_commented() -> None:
    """Each key in values.yaml has a comment right above it (Kubernetes' own resources
    mappings excepted), so `helm show values` documents itself."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):")
    resources_indent: int | None = None
    uncommented = []
    for i, line in enumerate(lines):
        m = key_re.match(line)
        if not m:
            continue
        indent = len(m.group(1))
        if resources_indent is not None and indent > resources_indent:
            continue
        resources_indent = indent if m.group(2) == "resources" else None
        previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if not previous.lstrip().startswith("#"):
            uncommented.append(f"line {i + 1}: {line.strip()}")
    assert uncommented == []


# ----------------------------------------------------------------------------------------
# the job spec the ConfigMap carries is one the CLI accepts
# ----------------------------------------------------------------------------------------
def test_example_job_spec_round_trips_through_the_configmap(rendered) -> None:
    example = _example_spec()
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    assert set(example) <= fields
    assert example["mode"] == "plan"
    direct = JobSpec.from_mapping(example, source=str(EXAMPLE_SPEC))
    carried = _job_spec_from_configmap(rendered["local-example-irsa"][0])
    assert JobSpec.from_mapping(carried, source="configmap") == direct
    # large integers and nulls survive Helm's JSON round trip
    full = _job_spec_from_configmap(rendered["chart-full-apply"][0])
    assert full["max_delete"] == 123456789 and isinstance(full["max_delete"], int)
    assert JobSpec.from_mapping(full).storage_options == {
        "requester_pays": True,
        "client_kwargs": {"region_name": "eu"},
    }
    for name, (docs, _) in rendered.items():
        JobSpec.from_mapping(_job_spec_from_configmap(docs), source=name)


def _write_png(path: Path, size: int, *, noise: bool) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if noise else None
    if pixels is None:
        pixels = np.full((size, size, 3), 200, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.slow
def test_configmap_spec_plans_with_the_cli(rendered, tmp_path) -> None:
    """The rendered ConfigMap's job spec drives a real `dedup-batch plan` on a local dataset
    (flags point it at local files instead of the example's bucket)."""
    if importlib.util.find_spec("dedup_batch.cli") is None:
        pytest.skip("dedup_batch.cli is not in this tree yet (the CLI lands from main)")
    import numpy as np
    import pandas as pd

    images = tmp_path / "images"
    images.mkdir()
    # a and b are near-duplicates (cosine distance ~1e-4); a is larger, so largest-size keeps it
    _write_png(images / "a.png", 64, noise=True)
    _write_png(images / "b.png", 16, noise=False)
    _write_png(images / "c.png", 16, noise=True)
    assert (images / "a.png").stat().st_size > (images / "b.png").stat().st_size
    emb = np.array([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    features = tmp_path / "features.npz"
    np.savez(features, paths=np.array(["a.png", "b.png", "c.png"]), embeddings=emb)

    spec = _job_spec_from_configmap(rendered["local-example-irsa"][0])
    spec["n_workers"], spec["threads_per_worker"] = 1, 1  # the test machine is small
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "plan"
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedup_batch",
            "plan",
            "--config",
            str(config),
            "--features",
            str(features),
            "--root",
            str(images),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    plan = pd.read_parquet(out / "plan.parquet")
    assert sorted(plan["path"]) == ["a.png", "b.png", "c.png"]
    dropped = plan.loc[~plan["keep"], "path"].tolist()
    assert dropped == ["b.png"]
    # a plan is a dry run: every image is still there
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "b.png", "c.png"]


def _doc_helm_installs() -> list[list[str]]:
    """The `helm install` commands of docs/kubernetes.md, as argument lists."""
    text = (ROOT / "docs" / "kubernetes.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if line.strip().startswith("helm install"):
                commands.append(shlex.split(line, comments=True))
    return commands


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def test_documented_installs_are_valid(chart) -> None:
    """Every `helm install` in docs/kubernetes.md passes the schema and renders valid objects
    (with -f spec-values.yaml standing for the example job spec)."""
    commands = _doc_helm_installs()
    assert len(commands) >= 4  # local, external, chart, apply
    modes = set()
    for argv in commands:
        values: dict[str, Any] = {}
        if "-f" in argv:
            assert argv[argv.index("-f") + 1] == "spec-values.yaml"
            values["jobSpec"] = _example_spec()
        for i, arg in enumerate(argv):
            if arg == "--set":
                _deep_merge(values, helm_python.parse_set_string(argv[i + 1]))
        chart.validate_schema(values)
        docs, _ = _render(chart, values)
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        modes.add(values.get("dask", {}).get("mode", "local"))
    assert modes == {"local", "external", "chart"}
