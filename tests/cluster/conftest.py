"""Fixtures for `make test-cluster`: a real one-node Kubernetes and isplit deployed on it.

``cluster`` runs ``scripts/cluster up`` (etcd, kube-apiserver, controller-manager, scheduler,
kubelet + containerd, kube-proxy, CoreDNS, the local registry, a kwok GPU node, Kafka and
Prometheus) and ``scripts/cluster down`` at the end (``ISPLIT_KEEP_CLUSTER=1`` keeps it for
debugging). ``deployed`` builds and pushes the images and deploys the chart with
``skaffold run -p local`` into a namespace that enforces Pod Security "restricted". Tests that
need only the control plane use ``cluster`` and never wait for an image build.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster"
NAMESPACE = "isplit"
RELEASE = "isplit"
TIMINGS = ROOT / "var" / "cluster-timings.json"


def record_timing(name: str, seconds: float) -> None:
    """Append a measured duration to var/cluster-timings.json (the README quotes them)."""
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    data[name] = round(seconds, 1)
    TIMINGS.write_text(json.dumps(data, indent=2) + "\n")


@dataclass
class Cluster:
    env: dict[str, str]
    node_ip: str
    registry: str
    kafka: str
    prometheus: str
    timings: dict[str, float] = field(default_factory=dict)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> str:
        """Run the project's kubectl against the cluster; stdout."""
        proc = subprocess.run(
            [str(ROOT / ".tools" / "bin" / "kubectl"), *args],
            env=self.env, input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout if check else proc.stdout + proc.stderr

    def json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def restricted_namespace(self, name: str) -> None:
        """Create (or keep) namespace ``name`` enforcing Pod Security "restricted"."""
        manifest = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ROOT / ".tools" / "bin" / "helm"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def node_port(self, service: str, port_name: str, namespace: str = NAMESPACE) -> int:
        svc = self.json("get", "service", service, "-n", namespace)
        return next(p["nodePort"] for p in svc["spec"]["ports"] if p["name"] == port_name)

    def cluster_ip(self, service: str, namespace: str = NAMESPACE) -> str:
        return self.json("get", "service", service, "-n", namespace)["spec"]["clusterIP"]

    def wait(self, what: str, timeout_s: float, predicate, interval_s: float = 1.0):
        """Poll ``predicate()`` until it returns a truthy value; that value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(interval_s)

    def prometheus_query(self, expr: str) -> list[dict]:
        body = requests.get(self.prometheus + "/api/v1/query", params={"query": expr}, timeout=30).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


def _parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    return env


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.fail("make test-cluster needs root (containerd, kubelet, bridges, iptables)")
    t0 = time.monotonic()
    up = subprocess.run([str(SCRIPT), "up"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600)
    if up.returncode != 0:
        pytest.fail(f"scripts/cluster up failed:\n{up.stderr[-4000:]}")
    record_timing("cluster_up_s", time.monotonic() - t0)
    extra = _parse_env(up.stdout)
    env = {**os.environ, **extra}
    c = Cluster(
        env=env,
        node_ip=extra["ISPLIT_CLUSTER_NODE_IP"],
        registry=extra["ISPLIT_CLUSTER_REGISTRY"],
        kafka=extra["ISPLIT_CLUSTER_KAFKA"],
        prometheus=extra["ISPLIT_CLUSTER_PROMETHEUS"],
    )
    try:
        yield c
    finally:
        if os.environ.get("ISPLIT_KEEP_CLUSTER") != "1":
            subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)


@dataclass
class Deployment:
    cluster: Cluster
    analyzer_url: str
    inference_base: str
    management_url: str
    artifact_dir: Path
    skaffold_s: float
    token: str = ""  # the chart's generated analyzer token, read from its Secret
    tail_keys: dict[str, str] | None = None  # the tail-serving gateway's inference-key, management-key

    def headers(self) -> dict[str, str]:
        """The analyzer API's Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    def tail_headers(self, api: str) -> dict[str, str]:
        """The tail-serving gateway's Authorization header for ``api`` (inference, management)."""
        return {"Authorization": f"Bearer {(self.tail_keys or {})[f'{api}-key']}"}

    def submit(self, model_id: str, options: dict) -> str:
        """Submit an analysis of ``model_id`` on digits; its id."""
        body = {"model_id": model_id, "dataset": "digits", "options": options}
        r = requests.post(self.analyzer_url + "/v1/analyses", json=body, headers=self.headers(), timeout=30)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def view(self, job: str) -> dict:
        """The analysis's API view."""
        return requests.get(f"{self.analyzer_url}/v1/analyses/{job}", headers=self.headers(), timeout=10).json()


def _deployments_available(c: Cluster) -> bool:
    items = c.json("get", "deployments", "-n", NAMESPACE)["items"]
    return bool(items) and all(d.get("status", {}).get("availableReplicas", 0) >= d["spec"]["replicas"] for d in items)


def skaffold_env(c: Cluster) -> dict[str, str]:
    """skaffold needs helm v3 first on PATH (it rejects v4) and the cluster's Docker engine."""
    helm3 = subprocess.run([str(ROOT / "scripts" / "k8s-tools"), "helm3-path"], capture_output=True, text=True,
                           check=True).stdout.strip()  # fmt: skip
    return {**c.env, "PATH": f"{helm3}:{c.env['PATH']}", "SKAFFOLD_UPDATE_CHECK": "false",
            "SKAFFOLD_INTERACTIVE": "false", "SKAFFOLD_COLLECT_METRICS": "false"}  # fmt: skip


@pytest.fixture(scope="session")
def deployed(cluster: Cluster) -> Deployment:
    """isplit built, pushed and deployed by ``skaffold run -p local`` (restricted namespace)."""
    c = cluster
    t0 = time.monotonic()
    tools = subprocess.run(
        [str(SCRIPT), "tools"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3600
    )
    if tools.returncode != 0:
        pytest.fail(f"scripts/cluster tools (skaffold, helm v3) failed:\n{tools.stderr[-4000:]}")
    record_timing("skaffold_tools_s", time.monotonic() - t0)
    c.restricted_namespace(NAMESPACE)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["skaffold", "run", "-p", "local", "--default-repo", c.registry, "--status-check=true",
         "--cache-artifacts=false", "--port-forward=off"],
        cwd=ROOT, env=skaffold_env(c), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=3000,
    )  # fmt: skip
    skaffold_s = time.monotonic() - t0
    record_timing("skaffold_run_s", skaffold_s)
    (ROOT / "var").mkdir(exist_ok=True)
    (ROOT / "var" / "skaffold-run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        pods = c.kubectl("get", "pods", "-A", "-o", "wide", check=False)
        pytest.fail(f"skaffold run -p local failed (var/skaffold-run.log):\n{proc.stderr[-3000:]}\n{pods}")
    c.wait("every Deployment available", 600, lambda: _deployments_available(c), 3)
    analyzer = f"http://{c.node_ip}:{c.node_port(f'{RELEASE}-analyzer', 'http')}"
    c.wait("the analyzer to answer through its NodePort", 120, lambda: _ok(analyzer + "/readyz"))
    inference = f"http://{c.node_ip}:{c.node_port(f'{RELEASE}-tail-serving', 'inference')}"
    management = f"http://{c.cluster_ip(f'{RELEASE}-tail-serving')}:8081"
    claim = next(
        p for p in c.json("get", "pvc", "-n", NAMESPACE)["items"] if p["metadata"]["name"].endswith("artifacts")
    )
    pv = c.json("get", "pv", claim["spec"]["volumeName"])
    secret = c.json("get", "secret", f"{RELEASE}-analyzer-auth", "-n", NAMESPACE)
    token = base64.b64decode(secret["data"]["token"]).decode()
    tail_secret = c.json("get", "secret", f"{RELEASE}-tail-serving-auth", "-n", NAMESPACE)["data"]
    tail_keys = {k: base64.b64decode(v).decode() for k, v in tail_secret.items()}
    return Deployment(c, analyzer, inference, management, Path(pv["spec"]["hostPath"]["path"]), skaffold_s, token,
                      tail_keys)  # fmt: skip


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False
