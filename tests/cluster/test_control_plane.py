"""The real control plane and node, before any isplit image exists.

Chart installs, server-side validation, Pod Security admission, and the trainer's executor
Jobs admitted and scheduled (the GPU one onto the kwok node that advertises nvidia.com/gpu):
these use only the API server, the scheduler and the kubelet, so they never wait for an image
build. Images are the cluster's own pause image where a pod must start.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from isplit_trainer.k8s_executor import JobTemplate

from .conftest import ROOT, Cluster

CHART = ROOT / "charts" / "isplit"
GPU_NODE = "isplit-gpu-node"


def _render(c: Cluster, namespace: str, *files: str, sets: tuple[str, ...] = ()) -> str:
    args = ["template", "isplit", str(CHART), "--namespace", namespace]
    for f in files:
        args += ["-f", str(CHART / f)]
    for s in sets:
        args += ["--set", s]
    proc = c.helm(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _pause(c: Cluster) -> tuple[str, ...]:
    image = f"{c.registry}/pause"
    return tuple(
        f"{component}.image.{field}={value}"
        for component in ("analyzer", "trainer", "tailServing")
        for field, value in (("repository", image), ("tag", "3.10"))
    )


def test_both_nodes_are_ready_at_the_pinned_version(cluster):
    nodes = {n["metadata"]["name"]: n for n in cluster.json("get", "nodes")["items"]}
    assert set(nodes) == {"isplit-node", GPU_NODE}
    for node in nodes.values():
        ready = next(x for x in node["status"]["conditions"] if x["type"] == "Ready")
        assert ready["status"] == "True", node["metadata"]["name"]
    assert nodes["isplit-node"]["status"]["nodeInfo"]["kubeletVersion"] == "v1.37.2"
    assert nodes[GPU_NODE]["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    version = json.loads(cluster.kubectl("version", "-o", "json"))["serverVersion"]
    assert version["gitVersion"] == "v1.37.2"


def test_cluster_dns_resolves_the_api_service(cluster):
    """CoreDNS answers for Services (the pods' resolv.conf points at it)."""
    import socket
    import struct

    name = b"".join(bytes([len(p)]) + p for p in b"kubernetes.default.svc.cluster.local".split(b".")) + b"\0"
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(query, (cluster.node_ip, 53))
        answer = sock.recv(512)
    assert answer[:2] == b"\x12\x34" and struct.unpack(">H", answer[6:8])[0] >= 1
    assert socket.inet_aton("10.96.0.1") in answer


@pytest.mark.parametrize(
    "files",
    [(), ("values-gpu.yaml",), ("values-local.yaml",), ("values-local.yaml", "values-gpu.yaml")],
    ids=["default", "gpu", "local", "local+gpu"],
)
def test_every_rendering_passes_server_side_validation(cluster, files):
    namespace = "isplit-validate"
    cluster.restricted_namespace(namespace)
    # Operator CRDs (ServiceMonitor, KafkaTopic) are not installed here: the defaults render none.
    rendered = _render(cluster, namespace, *files)
    out = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    kinds = {line.split("/")[0] for line in out.splitlines() if line}
    assert {"deployment.apps", "service", "configmap", "persistentvolumeclaim"} <= kinds, out


@pytest.mark.parametrize("security", [{}, {"privileged": True}], ids=["plain", "privileged"])
def test_restricted_namespace_rejects_pods_that_are_not_hardened(cluster, security):
    """The control: what `kubectl run` makes (no security context), or a privileged pod, is refused."""
    namespace = "isplit-psa"
    cluster.restricted_namespace(namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "plain-pod"},
        "spec": {"containers": [{"name": "c", "image": f"{cluster.registry}/pause:3.10", "securityContext": security}]},
    }
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)
    assert "violates PodSecurity" in out and '"restricted:latest"' in out, out


def test_chart_installs_and_its_pods_are_admitted_in_a_restricted_namespace(cluster):
    namespace = "isplit-install"
    cluster.restricted_namespace(namespace)
    proc = cluster.helm("install", "isplit", str(CHART), "-n", namespace, "-f", str(CHART / "values-local.yaml"),
                        *sum((("--set", s) for s in _pause(cluster)), ()))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        # Every Deployment's ReplicaSet created its pod: Pod Security admitted it.
        def admitted():
            pods = cluster.json("get", "pods", "-n", namespace)["items"]
            components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
            return components >= {"analyzer", "trainer", "tail-serving"}

        cluster.wait("the chart's pods to be admitted", 60, admitted)
        events = cluster.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate")
        assert "violates PodSecurity" not in events
        claims = cluster.json("get", "pvc", "-n", namespace)["items"]
        cluster.wait("the claims to bind to the static volumes", 60, lambda: all(
            p["status"].get("phase") == "Bound" for p in cluster.json("get", "pvc", "-n", namespace)["items"]))  # fmt: skip
        assert claims
    finally:
        cluster.helm("uninstall", "isplit", "-n", namespace, "--wait")
        cluster.kubectl("delete", "pvc", "--all", "-n", namespace, "--wait=false", check=False)


def _job_template(c: Cluster, namespace: str, *files: str) -> JobTemplate:
    rendered = _render(c, namespace, *files, sets=("trainer.executor=kubernetes", *_pause(c)))
    config = next(
        d for d in yaml.safe_load_all(rendered)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "isplit-trainer"
    )  # fmt: skip
    return JobTemplate.from_json(config["data"]["ISPLIT_TRAINER_JOB_TEMPLATE"])


def _pod_of(c: Cluster, namespace: str, job: str) -> dict | None:
    pods = c.json("get", "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
    return pods[0] if pods and pods[0]["spec"].get("nodeName") else None


@pytest.mark.parametrize(
    ("files", "node", "gpus"),
    [(("values-local.yaml",), "isplit-node", None), (("values-local.yaml", "values-gpu.yaml"), GPU_NODE, "1")],
    ids=["cpu", "gpu"],
)
def test_executor_job_is_admitted_and_scheduled_where_its_values_say(cluster, files, node, gpus):
    """The Job the trainer's kubernetes executor builds from the chart's template, created for real:
    admitted under "restricted" and bound by the scheduler (the GPU one to the GPU node)."""
    namespace = "isplit-jobs"
    cluster.restricted_namespace(namespace)
    template = _job_template(cluster, namespace, *files)
    candidate_id = f"a-test:{uuid.uuid4().hex[:6]}:features.3"
    job = template.build(candidate_id=candidate_id, analysis_id="a-test", candidate_json="{}")
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["/pause"]
    name = job["metadata"]["name"]
    # The chart creates this ServiceAccount and the artifact claim; the Job alone needs them too.
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": template.service_account}}
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": template.artifact_claim},
        "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "isplit-hostpath",
                 "resources": {"requests": {"storage": "1Gi"}}},
    }  # fmt: skip
    for manifest in (account, claim):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job))
    try:
        pod = cluster.wait(f"Job {name}'s pod to be scheduled", 60, lambda: _pod_of(cluster, namespace, name))
        assert pod["spec"]["nodeName"] == node
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        assert limits.get("nvidia.com/gpu") == gpus
        if gpus:
            assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    finally:
        cluster.kubectl("delete", "job", name, "-n", namespace, "--cascade=foreground", "--wait=false", check=False)
