"""The Helm chart charts/isplit, rendered by the real helm and checked by real validators.

Scenarios: the default values, the GPU values (values-gpu.yaml, skaffold's "gpu" profile),
every optional feature on (kubernetes executor, Strimzi topics, ServiceMonitors,
PrometheusRule, dashboards, strict NetworkPolicies, external database), and the PodMonitor
variant. Every rendered manifest is validated strictly against the Kubernetes 1.30 and newest
schemas that kubernetes-validate ships; custom resources against their CRDs' shapes.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from isplit.auth import TokenStore
from tests import promql

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "isplit"
TOOLS_BIN = ROOT / ".tools" / "bin"
RELEASE = "isplit"
NAMESPACE = "ml"
K8S_VERSIONS = ("1.30.0", kv.latest_version())
WORKLOADS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}

ALL_FEATURES = {
    "trainer": {"executor": "kubernetes", "kubernetesExecutor": {"gpuCount": 1}},
    "kafka": {"strimzi": {"topics": True, "namespace": "kafka", "clusterName": "prod"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusNamespaceSelector": {"kubernetes.io/metadata.name": "monitoring"},
        "prometheusPodSelector": {"app.kubernetes.io/name": "prometheus"},
    },
    "dashboards": {"enabled": True, "namespace": "monitoring"},
    "networkPolicy": {
        "allowExternal": False,
        "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "kubeApiServer": {"cidrs": ["10.0.0.1/32"]},
        "kafka": {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}]},
        "database": {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]},
    },
    "analyzer": {
        "replicaCount": 2,
        "database": {"existingSecret": "isplit-database", "leaseSeconds": 12},
        "auth": {"existingSecret": "isplit-api-tokens", "existingSecretKey": "tokens"},
        "executor": "kubernetes",
        "kubernetesExecutor": {
            "shards": 3,
            "gpuCount": 1,
            "device": "cuda",
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
        },
    },
    "tailServing": {
        "autoscaling": {"targetMemoryUtilizationPercentage": 80},
        "pdb": {"minAvailable": "", "maxUnavailable": "50%"},
        "auth": {"existingSecret": "isplit-tail-keys"},
    },
    "global": {"imagePullSecrets": ["registry-credentials"]},
}

# The shapes of the custom resources the chart can render, after their CRDs (Prometheus
# operator monitoring.coreos.com/v1, Strimzi kafka.strimzi.io/v1beta2): the fields used here,
# with unknown fields rejected, as the API server does for structural CRD schemas.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {
            "type": "string",
            "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
        "scrapeTimeout": {
            "type": "string",
            "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        },
    },
}
CRD_SPEC_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": _NS_SELECTOR,
            "selector": _SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "jobLabel": {"type": "string"},
            "namespaceSelector": _NS_SELECTOR,
            "selector": _SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string"},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["expr"],
                                "properties": {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"type": ["string", "integer"]},
                                    "for": {"type": "string"},
                                    "keep_firing_for": {"type": "string"},
                                    "labels": _LABELS,
                                    "annotations": _LABELS,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): {
        "type": "object",
        "additionalProperties": False,
        "required": ["partitions", "replicas"],
        "properties": {
            "topicName": {"type": "string"},
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": {"type": "object"},
        },
    },
}


# --- rendering ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> str:
    """The helm binary: .tools/bin/helm, fetched by scripts/k8s-tools when absent."""
    binary = TOOLS_BIN / "helm"
    if not binary.exists():
        subprocess.run([str(ROOT / "scripts" / "k8s-tools"), "fetch"], check=True, timeout=600)
    assert binary.exists(), "scripts/k8s-tools fetch did not provide helm"
    return str(binary)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, tmp_path_factory, values: dict | None = None, files=(), release=RELEASE) -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", NAMESPACE, "--kube-version", "1.30.0"]
    for file in files:
        args += ["-f", str(file)]
    if values:
        path = tmp_path_factory.mktemp("values") / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def default_docs(helm, tmp_path_factory):
    return render(helm, tmp_path_factory)


@pytest.fixture(scope="session")
def gpu_docs(helm, tmp_path_factory):
    return render(helm, tmp_path_factory, files=[CHART / "values-gpu.yaml"])


@pytest.fixture(scope="session")
def all_docs(helm, tmp_path_factory):
    return render(helm, tmp_path_factory, ALL_FEATURES, files=[CHART / "values-gpu.yaml"])


@pytest.fixture(scope="session")
def podmonitor_docs(helm, tmp_path_factory):
    return render(
        helm,
        tmp_path_factory,
        {"metrics": {"podMonitor": {"enabled": True}}, "trainer": {"executor": "kubernetes"}},
    )


@pytest.fixture(scope="session")
def scenarios(default_docs, gpu_docs, all_docs, podmonitor_docs):
    return {"default": default_docs, "gpu": gpu_docs, "all-features": all_docs, "podmonitor": podmonitor_docs}


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def one(docs, kind, name):
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs):
    """(label, pod spec) of every workload."""
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]) for d in docs if d["kind"] in WORKLOADS
    ]


def containers(spec):
    return [("init", c) for c in spec.get("initContainers", [])] + [("main", c) for c in spec["containers"]]


def config_env(docs, component):
    return one(docs, "ConfigMap", f"{RELEASE}-{component}")["data"]


# --- helm itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [[], ["-f", str(CHART / "values-gpu.yaml")], ["--set", "trainer.executor=kubernetes,dashboards.enabled=true"]],
    ids=["default", "gpu", "kubernetes-executor"],
)
def test_helm_lint_strict_passes(helm, extra):
    result = run_helm(helm, "lint", "--strict", str(CHART), "--kube-version", "1.30.0", *extra)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("trainer.executor=docker", "/trainer/executor"),
        ("trainer.device=tpu", "/trainer/device"),
        ("analyzer.podSecurityContext.runAsNonRoot=false", "runAsNonRoot"),
        ("tailServing.containerSecurityContext.allowPrivilegeEscalation=true", "allowPrivilegeEscalation"),
        ("kafka.bootstrapServers=not-an-address", "bootstrapServers"),
        ("artifacts.persistence.accessModes={ReadWriteEverywhere}", "accessModes"),
        ("analyzer.unknownSetting=1", "unknownSetting"),
        ("analyzer.database.leaseSeconds=0", "leaseSeconds"),
    ],
)
def test_values_schema_rejects_bad_values(helm, flag, message):
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set", flag)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["analyzer.replicaCount=2"], "needs a shared database"),
        (["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"], "enable one of them"),
        (["kafka.bootstrapServers="], "/kafka/bootstrapServers"),
        (["kafka.sasl.enabled=true"], "kafka.sasl.enabled needs kafka.sasl.existingSecret"),
    ],
)
def test_chart_refuses_combinations_that_cannot_work(helm, flags, message):
    args = ["template", RELEASE, str(CHART)]
    for flag in flags:
        args += ["--set", flag]
    result = run_helm(helm, *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_chart_reports_every_impossible_combination_at_once(helm):
    flags = ["analyzer.replicaCount=2", "metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"]
    result = run_helm(helm, "template", RELEASE, str(CHART), *sum((["--set", f] for f in flags), []))
    assert result.returncode != 0
    assert "needs a shared database" in result.stderr and "enable one of them" in result.stderr


def test_topic_names_are_the_contract_with_one_prefix_for_services_and_kafka_topics(helm, tmp_path_factory):
    from isplit.messages import TOPIC_PARTITIONS

    docs = render(helm, tmp_path_factory, {"kafka": {"topicPrefix": "stg.", "strimzi": {"topics": True}}})
    assert {t["spec"]["topicName"] for t in find(docs, "KafkaTopic")} == {f"stg.{n}" for n in TOPIC_PARTITIONS}
    for component in ("analyzer", "trainer"):
        assert config_env(docs, component)["ISPLIT_TOPIC_PREFIX"] == "stg."
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert all("name" not in topic for topic in values["kafka"]["topics"].values()), "names are not values"


def test_values_files_validate_against_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    gpu = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(_merge(values, gpu))


def _merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def test_every_value_is_documented():
    """Bitnami convention: each leaf value has a `## @param <path>` line in values.yaml."""
    text = (CHART / "values.yaml").read_text()
    documented = {line.split()[2] for line in text.splitlines() if line.strip().startswith("## @param ")}

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and path not in documented:
                yield from leaves(value, f"{path}.")
            else:
                yield path

    missing = [path for path in leaves(yaml.safe_load(text)) if path not in documented]
    assert not missing, f"undocumented values: {missing}"


# --- schema validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "gpu", "all-features", "podmonitor"])
def test_every_manifest_validates_strictly_against_kubernetes_schemas(scenarios, scenario):
    docs = scenarios[scenario]
    assert len(docs) >= 15
    errors = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SPEC_SCHEMAS:
            _validate_custom_resource(doc)
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def _validate_custom_resource(doc):
    """metadata against the Kubernetes ObjectMeta schema, spec against the CRD's shape."""
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}, doc["kind"]
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kv.validate(configmap, "1.30.0", strict=True)
    jsonschema.Draft7Validator(CRD_SPEC_SCHEMAS[(doc["apiVersion"], doc["kind"])]).validate(doc["spec"])


def test_custom_resources_appear_only_when_enabled(default_docs, all_docs):
    custom = {kind for _, kind in CRD_SPEC_SCHEMAS}
    assert not [d for d in default_docs if d["kind"] in custom]
    assert {d["kind"] for d in all_docs} >= {"ServiceMonitor", "PrometheusRule", "KafkaTopic"}


def test_unknown_kinds_are_not_rendered(scenarios):
    """Every kind is either a built-in that kubernetes-validate knows or a checked custom resource."""
    for docs in scenarios.values():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) not in CRD_SPEC_SCHEMAS:
                kv.validate(doc, "1.30.0", strict=True)  # raises SchemaNotFoundError for an unknown kind


# --- labels and names ------------------------------------------------------------------------------


STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


@pytest.mark.parametrize("scenario", ["default", "all-features"])
def test_every_resource_has_the_standard_labels(scenarios, scenario):
    for doc in scenarios[scenario]:
        labels = doc["metadata"].get("labels", {})
        for label in STANDARD_LABELS:
            assert label in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks {label}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_workloads_select_their_component_pods(all_docs):
    for doc in find(all_docs, "Deployment"):
        selector = doc["spec"]["selector"]["matchLabels"]
        pod_labels = doc["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert "app.kubernetes.io/component" in selector
    names = {d["metadata"]["name"] for d in find(all_docs, "Deployment")}
    assert names == {f"{RELEASE}-analyzer", f"{RELEASE}-trainer", f"{RELEASE}-tail-serving"}


def test_services_expose_the_contract_ports(default_docs):
    ports = {
        svc["metadata"]["name"]: {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        for svc in find(default_docs, "Service")
    }
    assert ports == {
        f"{RELEASE}-analyzer": {"http": 8000},
        f"{RELEASE}-trainer-metrics": {"metrics": 9101},
        f"{RELEASE}-tail-serving": {"inference": 8080, "management": 8081, "metrics": 8082},
    }


# --- security ------------------------------------------------------------------------------------


ALLOWED_VOLUME_TYPES = {
    "configMap",
    "emptyDir",
    "persistentVolumeClaim",
    "secret",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
}


@pytest.mark.parametrize("scenario", ["default", "gpu", "all-features"])
def test_pods_meet_pod_security_restricted(scenarios, scenario):
    for label, spec in pod_specs(scenarios[scenario]):
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, label
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", label
        assert pod_sc.get("runAsUser", 1) != 0, label
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{label} {host}"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= ALLOWED_VOLUME_TYPES, f"{label} volume {volume['name']} is {kinds}"
        for _, container in containers(spec):
            sc = container["securityContext"]
            where = f"{label} container {container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not set(sc["capabilities"].get("add", [])) - {"NET_BIND_SERVICE"}, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert all("hostPort" not in port for port in container.get("ports", [])), where


@pytest.mark.parametrize("scenario", ["default", "all-features"])
def test_read_only_containers_get_a_writable_tmp(scenarios, scenario):
    for label, spec in pod_specs(scenarios[scenario]):
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for kind, container in containers(spec):
            if kind == "init":
                continue
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in empty_dirs, f"{label} has no writable /tmp"
        for volume in spec["volumes"]:
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{label} emptyDir {volume['name']} is unbounded"


@pytest.mark.parametrize("scenario", ["default", "gpu", "all-features"])
def test_every_container_has_resources_and_probes(scenarios, scenario):
    for label, spec in pod_specs(scenarios[scenario]):
        for kind, container in containers(spec):
            where = f"{label} container {container['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
            if kind == "main":
                assert "livenessProbe" in container and "readinessProbe" in container, where
                assert "startupProbe" in container, where


def test_probes_use_the_health_endpoints(default_docs):
    analyzer = one(default_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]["containers"][0]
    assert analyzer["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert analyzer["readinessProbe"]["httpGet"]["path"] == "/readyz"
    trainer = one(default_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]["containers"][0]
    assert trainer["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert trainer["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    torchserve, gateway = one(default_docs, "Deployment", f"{RELEASE}-tail-serving")["spec"]["template"]["spec"][
        "containers"
    ]
    assert torchserve["livenessProbe"]["tcpSocket"] == torchserve["readinessProbe"]["tcpSocket"] == {"port": "metrics"}
    # The pod is ready when TorchServe answers /ping through the gateway (with TorchServe's key).
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "inference"}
    assert gateway["livenessProbe"]["tcpSocket"] == {"port": "inference"}


def test_no_secrets_are_rendered_or_kept_in_values(all_docs):
    assert not find(all_docs, "Secret")
    values = (CHART / "values.yaml").read_text()
    secret_keys = re.findall(
        r"^\s*(password|passwd|token|apiKey|secret|secretKey|clientSecret)\s*:", values, re.M | re.I
    )
    assert not secret_keys, f"values.yaml declares secret values: {secret_keys}"
    analyzer = one(all_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]["containers"][0]
    database = next(e for e in analyzer["env"] if e["name"] == "DATABASE_URL")
    assert database["valueFrom"]["secretKeyRef"] == {"name": "isplit-database", "key": "DATABASE_URL"}
    assert "DATABASE_URL" not in config_env(all_docs, "analyzer")


def test_kafka_sasl_credentials_come_from_the_existing_secret(helm, tmp_path_factory):
    values = {"kafka": {"sasl": {"enabled": True, "existingSecret": "isplit-kafka-user", "username": "isplit"}}}
    docs = render(helm, tmp_path_factory, values)
    for component in ("analyzer", "trainer"):
        container = one(docs, "Deployment", f"{RELEASE}-{component}")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["ISPLIT_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_PLAINTEXT"
        assert env["ISPLIT_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
        assert env["ISPLIT_KAFKA_SASL_USERNAME"]["value"] == "isplit"
        assert env["ISPLIT_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "isplit-kafka-user",
            "key": "password",
        }
    # The Kafka credentials are only referenced; the Secrets rendered hold the generated keys.
    assert sorted(d["metadata"]["name"] for d in find(docs, "Secret")) == [
        f"{RELEASE}-analyzer-auth",
        f"{RELEASE}-tail-serving-auth",
    ]


# --- the analyzer's job store --------------------------------------------------------------------


def test_analyzer_replicas_share_an_external_postgresql(all_docs):
    deployment = one(all_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]
    assert deployment["replicas"] == 2
    assert "strategy" not in deployment  # rolling updates: a stopping replica hands its jobs back
    volumes = {v["name"]: v for v in deployment["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]
    assert f"{RELEASE}-analyzer" not in {c["metadata"]["name"] for c in find(all_docs, "PersistentVolumeClaim")}
    assert config_env(all_docs, "analyzer")["ISPLIT_ANALYZER_LEASE_SECONDS"] == "12"
    database = [rule for rule in _policy(all_docs, "analyzer")["egress"] if 5432 in _ports(rule)]
    assert database == [{"ports": [{"port": 5432, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]}]


def test_sqlite_state_keeps_one_replica_and_no_database_egress(default_docs):
    deployment = one(default_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]
    assert (deployment["replicas"], deployment["strategy"]) == (1, {"type": "Recreate"})
    assert config_env(default_docs, "analyzer")["ISPLIT_ANALYZER_LEASE_SECONDS"] == "30"
    ports = set().union(*(_ports(rule) for rule in _policy(default_docs, "analyzer")["egress"]))
    assert 5432 not in ports


def test_the_analyzer_reads_the_charts_database_settings(all_docs, monkeypatch):
    from isplit_analyzer.config import Settings

    for key, value in config_env(all_docs, "analyzer").items():
        monkeypatch.setenv(key, value)
    # What the Secret holds, as a managed PostgreSQL hands it out (no driver in the scheme).
    monkeypatch.setenv("DATABASE_URL", "postgresql://isplit:pw@postgres.db:5432/isplit")
    settings = Settings()
    assert settings.db_url() == "postgresql+psycopg://isplit:pw@postgres.db:5432/isplit"
    assert settings.analyzer_lease_seconds == 12.0


# --- GPU scheduling --------------------------------------------------------------------------------


def _limits(docs, name):
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_default_values_request_no_gpu(default_docs):
    for doc in default_docs:
        assert "nvidia.com/gpu" not in json.dumps(doc), f"{doc['kind']}/{doc['metadata']['name']}"


def test_gpu_values_put_the_trainer_on_gpu_nodes(gpu_docs, default_docs):
    trainer = one(gpu_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]
    assert trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert trainer["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in trainer["tolerations"]
    assert config_env(gpu_docs, "trainer")["ISPLIT_TRAINER_DEVICE"] == "cuda"
    # One trainer image for CPU and GPU nodes: the base image's torch (PyPI) is the CUDA build.
    default_trainer = one(default_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]
    assert trainer["containers"][0]["image"] == default_trainer["containers"][0]["image"]
    for other in (f"{RELEASE}-analyzer", f"{RELEASE}-tail-serving"):
        assert "nvidia.com/gpu" not in _limits(gpu_docs, other)


def test_kubernetes_executor_gives_gpus_to_jobs_not_to_the_trainer(all_docs):
    assert "nvidia.com/gpu" not in _limits(all_docs, f"{RELEASE}-trainer")
    template = json.loads(config_env(all_docs, "trainer")["ISPLIT_TRAINER_JOB_TEMPLATE"])
    assert template["gpu_count"] == 1
    assert template["node_selector"] == {"nvidia.com/gpu.present": "true"}


# --- RBAC ---------------------------------------------------------------------------------------


def test_inline_executor_gets_no_api_access(default_docs):
    assert not find(default_docs, "Role") and not find(default_docs, "RoleBinding")
    trainer = one(default_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]
    assert trainer["automountServiceAccountToken"] is False
    for label, spec in pod_specs(default_docs):
        assert spec["automountServiceAccountToken"] is False, label


def test_kubernetes_executor_rbac_is_least_privilege(all_docs):
    assert not find(all_docs, "ClusterRole") and not find(all_docs, "ClusterRoleBinding")
    role = one(all_docs, "Role", f"{RELEASE}-trainer")
    assert role["metadata"]["namespace"] == NAMESPACE
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): sorted(["create", "get", "list", "watch", "delete"]),
        (("",), ("pods",)): ["list"],
        (("",), ("pods/log",)): ["get"],
    }
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "resourceNames" not in rule
    binding = one(all_docs, "RoleBinding", f"{RELEASE}-trainer")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{RELEASE}-trainer"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-trainer", "namespace": NAMESPACE}]
    trainer = one(all_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]
    assert trainer["serviceAccountName"] == f"{RELEASE}-trainer"
    assert trainer["automountServiceAccountToken"] is True
    job_account = one(all_docs, "ServiceAccount", f"{RELEASE}-training-job")
    assert job_account["automountServiceAccountToken"] is False
    assert not [b for b in find(all_docs, "RoleBinding") if b["subjects"][0]["name"] == f"{RELEASE}-training-job"]


def test_analyzer_kubernetes_executor_rbac_is_least_privilege(all_docs):
    role = one(all_docs, "Role", f"{RELEASE}-analyzer")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): sorted(["create", "get", "list", "watch", "delete"]),
        (("",), ("pods",)): ["list"],
        (("",), ("pods/log",)): ["get"],
    }
    binding = one(all_docs, "RoleBinding", f"{RELEASE}-analyzer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-analyzer", "namespace": NAMESPACE}]
    analyzer = one(all_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]
    assert analyzer["serviceAccountName"] == f"{RELEASE}-analyzer"
    assert analyzer["automountServiceAccountToken"] is True
    assert one(all_docs, "ServiceAccount", f"{RELEASE}-analysis-job")["automountServiceAccountToken"] is False
    egress = _policy(all_docs, "analyzer")["egress"]
    assert [_ports(rule) for rule in egress] == [{53}, {9092, 9093}, {5432}, {443, 6443}]  # DNS, Kafka, DB, API


def test_chart_analysis_job_template_builds_a_valid_indexed_job_the_policies_select(all_docs):
    from isplit_analyzer.executors import AnalysisJobTemplate

    env = config_env(all_docs, "analyzer")
    assert env["ISPLIT_ANALYZER_EXECUTOR"] == "kubernetes" and env["ISPLIT_ANALYZER_SHARDS"] == "3"
    template = AnalysisJobTemplate.from_json(env["ISPLIT_ANALYZER_JOB_TEMPLATE"])
    job = template.build(analysis_id="a-0123456789ab", request_json="{}", shards=3)
    for version in K8S_VERSIONS:
        kv.validate(job, version, strict=True)
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 3)
    pod = job["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-analysis-job"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    analyzer = one(all_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]
    assert pod["spec"]["containers"][0]["image"] == analyzer["containers"][0]["image"]
    policy = _policy(all_docs, "analysis-job")
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "ingress" not in policy and "egress" not in policy
    analyzer_policy = _policy(all_docs, "analyzer")
    assert not (analyzer_policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items())


def test_chart_job_template_builds_a_valid_job_the_policies_select(all_docs):
    from isplit_trainer.k8s_executor import JobTemplate

    template = JobTemplate.from_json(config_env(all_docs, "trainer")["ISPLIT_TRAINER_JOB_TEMPLATE"])
    job = template.build(candidate_id="a1b2-layer3_1", analysis_id="a1b2", candidate_json='{"schema_version": 1}')
    for version in K8S_VERSIONS:
        kv.validate(job, version, strict=True)
    pod = job["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-training-job"
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert one(all_docs, "PersistentVolumeClaim", claim)
    assert job["metadata"]["namespace"] == NAMESPACE
    policy = one(all_docs, "NetworkPolicy", f"{RELEASE}-training-job")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    trainer_policy = one(all_docs, "NetworkPolicy", f"{RELEASE}-trainer")
    assert not (trainer_policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items())


# --- configuration ----------------------------------------------------------------------------------


def test_services_get_their_settings_from_the_chart(default_docs):
    analyzer = config_env(default_docs, "analyzer")
    assert analyzer["ISPLIT_KAFKA_BOOTSTRAP"] == "my-cluster-kafka-bootstrap.kafka.svc:9092"
    assert analyzer["ISPLIT_ARTIFACT_ROOT"] == "/var/lib/isplit/artifacts"
    assert analyzer["ISPLIT_ANALYZER_PORT"] == "8000"
    assert analyzer["ISPLIT_ANALYZER_WORKERS"] == "1"
    assert analyzer["DATABASE_URL"] == "sqlite:////var/lib/isplit/analyzer/analyzer.db"
    trainer = config_env(default_docs, "trainer")
    assert trainer["ISPLIT_KAFKA_BOOTSTRAP"] == analyzer["ISPLIT_KAFKA_BOOTSTRAP"]
    assert trainer["ISPLIT_TORCHSERVE_MANAGEMENT_URL"] == f"http://{RELEASE}-tail-serving:8081"
    assert trainer["ISPLIT_TORCHSERVE_INFERENCE_URL"] == f"http://{RELEASE}-tail-serving:8080"
    assert trainer["ISPLIT_TRAINER_METRICS_PORT"] == "9101"
    assert trainer["ISPLIT_TRAINER_EXECUTOR"] == "inline"
    assert trainer["ISPLIT_TRAINER_DEVICE"] == "auto"
    for name in ("analyzer", "trainer"):
        deployment = one(default_docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        assert deployment["containers"][0]["envFrom"][0]["configMapRef"]["name"] == f"{RELEASE}-{name}"


def test_torchserve_config_serves_prometheus_metrics_from_the_shared_model_store(default_docs):
    properties = dict(
        line.split("=", 1)
        for line in config_env(default_docs, "tail-serving")["config.properties"].splitlines()
        if "=" in line and not line.startswith("#")
    )
    # Inference and management only inside the pod, behind the gateway; token authorization on.
    assert properties["inference_address"] == "http://127.0.0.1:18080"
    assert properties["management_address"] == "http://127.0.0.1:18081"
    assert "disable_token_authorization" not in properties
    assert properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    assert properties["model_store"] == "/var/lib/isplit/artifacts/model-store"
    assert properties["enable_model_api"] == "true"
    # Only archives in the model store may be registered (Java properties: a doubled backslash is one).
    assert properties["allowed_urls"] == r"file:///var/lib/isplit/artifacts/model-store/[^/]+\\.mar"
    # The image keeps the repository layout under /opt/isplit (see services/tail-serving/Dockerfile).
    assert properties["metrics_config"] == "/opt/isplit/services/tail-serving/metrics.yaml"
    dockerfile = (ROOT / "services" / "tail-serving" / "Dockerfile").read_text()
    assert "services/tail-serving/metrics.yaml /opt/isplit/services/tail-serving/" in dockerfile
    assert config_env(default_docs, "trainer")["ISPLIT_TORCHSERVE_MODEL_STORE"] == properties["model_store"]


def test_all_components_share_one_read_write_many_artifact_claim(default_docs):
    claim = one(default_docs, "PersistentVolumeClaim", f"{RELEASE}-artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for label, spec in pod_specs(default_docs):
        volume = next(v for v in spec["volumes"] if v["name"] == "artifacts")
        assert volume["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-artifacts", label
        mounts = {m["name"]: m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert mounts["artifacts"] == "/var/lib/isplit/artifacts", label


def test_existing_claims_replace_the_created_ones(helm, tmp_path_factory):
    docs = render(
        helm,
        tmp_path_factory,
        {
            "artifacts": {"persistence": {"existingClaim": "nfs-artifacts"}},
            "analyzer": {"persistence": {"existingClaim": "state"}},
        },
    )
    assert not find(docs, "PersistentVolumeClaim")
    for label, spec in pod_specs(docs):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert "nfs-artifacts" in claims, label
    analyzer = one(docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "state"}} in analyzer["volumes"]


def test_strimzi_topics_follow_the_values(all_docs):
    topics = {t["spec"]["topicName"]: t for t in find(all_docs, "KafkaTopic")}
    assert set(topics) == {"isplit.split-candidates.v1", "isplit.training-results.v1", "isplit.dead-letter.v1"}
    candidates = topics["isplit.split-candidates.v1"]
    assert candidates["metadata"]["namespace"] == "kafka"
    assert candidates["metadata"]["labels"]["strimzi.io/cluster"] == "prod"
    assert candidates["spec"]["partitions"] == 6 and candidates["spec"]["replicas"] == 3
    assert candidates["spec"]["config"]["retention.ms"] == "604800000"


def test_torchserve_scales_and_survives_disruption(default_docs, all_docs):
    hpa = one(default_docs, "HorizontalPodAutoscaler", f"{RELEASE}-tail-serving")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{RELEASE}-tail-serving",
    }
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 8
    assert "replicas" not in one(default_docs, "Deployment", f"{RELEASE}-tail-serving")["spec"]
    assert one(default_docs, "PodDisruptionBudget", f"{RELEASE}-tail-serving")["spec"]["minAvailable"] == 1
    assert one(all_docs, "PodDisruptionBudget", f"{RELEASE}-tail-serving")["spec"]["maxUnavailable"] == "50%"
    metrics = {
        m["resource"]["name"]
        for m in one(all_docs, "HorizontalPodAutoscaler", f"{RELEASE}-tail-serving")["spec"]["metrics"]
    }
    assert metrics == {"cpu", "memory"}


# --- network policies ------------------------------------------------------------------------------


def _policy(docs, component):
    return one(docs, "NetworkPolicy", f"{RELEASE}-{component}")["spec"]


def _ports(rule):
    return {p["port"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("scenario", ["default", "all-features"])
def test_every_pod_is_isolated_both_ways(scenarios, scenario):
    docs = scenarios[scenario]
    policies = find(docs, "NetworkPolicy")
    for doc in find(docs, "Deployment"):
        pod_labels = doc["spec"]["template"]["metadata"]["labels"]
        selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
        assert len(selecting) == 1, doc["metadata"]["name"]
        assert selecting[0]["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_only_the_trainer_reaches_torchserve_management(all_docs):
    trainer_selector = one(all_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["selector"]["matchLabels"]
    ingress = _policy(all_docs, "tail-serving")["ingress"]
    management = [rule for rule in ingress if "management" in _ports(rule)]
    assert management == [
        {
            "from": [{"podSelector": {"matchLabels": trainer_selector}}],
            "ports": [{"port": "management", "protocol": "TCP"}],
        }
    ]
    for rule in ingress:
        assert "from" in rule, "with allowExternal=false no rule may admit everyone"


def test_default_policies_let_clients_call_the_apis_and_nothing_else(default_docs):
    analyzer = _policy(default_docs, "analyzer")
    assert analyzer["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    trainer = _policy(default_docs, "trainer")
    assert [_ports(rule) for rule in trainer["ingress"]] == [{"metrics"}]
    assert {443, 6443}.isdisjoint(set().union(*(_ports(rule) for rule in trainer["egress"])))
    torchserve_egress = _policy(default_docs, "tail-serving")["egress"]
    assert [_ports(rule) for rule in torchserve_egress] == [{53}]


def test_trainer_egress_reaches_kafka_torchserve_and_the_api_server_only(all_docs):
    egress = _policy(all_docs, "trainer")["egress"]
    ports = [_ports(rule) for rule in egress]
    assert ports == [{53}, {9092, 9093}, {"inference", "management"}, {443, 6443}]
    assert egress[3]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert egress[1]["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kafka"}}}]


def test_training_jobs_may_talk_to_nobody(all_docs):
    policy = _policy(all_docs, "training-job")
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in policy and "egress" not in policy


# --- observability -------------------------------------------------------------------------------


def test_pods_carry_scrape_annotations(default_docs):
    expected = {f"{RELEASE}-analyzer": "8000", f"{RELEASE}-trainer": "9101", f"{RELEASE}-tail-serving": "8082"}
    for name, port in expected.items():
        annotations = one(default_docs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"


def test_service_monitors_scrape_the_metrics_ports(all_docs):
    services = {s["metadata"]["name"]: s for s in find(all_docs, "Service")}
    monitors = find(all_docs, "ServiceMonitor")
    assert len(monitors) == 3
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in port_names


def test_pod_monitor_scrapes_every_component(podmonitor_docs):
    monitor = one(podmonitor_docs, "PodMonitor", RELEASE)
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    for doc in find(podmonitor_docs, "Deployment"):
        container_ports = {p["name"] for c in doc["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert ports & container_ports, doc["metadata"]["name"]
    assert not find(podmonitor_docs, "ServiceMonitor")


def test_prometheus_rule_carries_the_checked_alerts_file(all_docs, tmp_path):
    rule = one(all_docs, "PrometheusRule", RELEASE)
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())
    rendered = tmp_path / "rendered.rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    ok, output = promql.run_promtool("check", "rules", str(rendered))
    assert ok, output


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar(all_docs):
    files = sorted((CHART / "dashboards").glob("*.json"))
    maps = [d for d in find(all_docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(maps) == len(files) == 3
    by_key = {key: value for m in maps for key, value in m["data"].items()}
    for path in files:
        assert json.loads(by_key[path.name]) == json.loads(path.read_text())
    for config_map in maps:
        assert config_map["metadata"]["namespace"] == "monitoring"
        assert config_map["metadata"]["annotations"]["grafana_folder"] == "isplit"


def test_notes_render(helm):
    result = run_helm(helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    assert f"port-forward svc/{RELEASE}-analyzer 8000:8000" in result.stdout
    assert f"get secret {RELEASE}-analyzer-auth -o jsonpath='{{.data.token}}' | base64 -d" in result.stdout
    assert f"get secret {RELEASE}-tail-serving-auth -o jsonpath='{{.data.inference-key}}' | base64 -d" in result.stdout


# --- API authentication -----------------------------------------------------------------------------


def _auth_volume(docs) -> tuple[dict, dict]:
    spec = one(docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "auth")
    return next(v for v in spec["volumes"] if v["name"] == "auth"), mount


def test_the_chart_generates_an_analyzer_token_whose_hash_the_mounted_token_file_holds(default_docs, tmp_path):
    secret = one(default_docs, "Secret", f"{RELEASE}-analyzer-auth")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert token.startswith("isplit_") and len(token) == 50
    volume, mount = _auth_volume(default_docs)
    assert volume["secret"]["secretName"] == f"{RELEASE}-analyzer-auth"
    assert volume["secret"]["items"] == [{"key": "tokens.jsonl", "path": "tokens.jsonl"}]
    analyzer = one(default_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in analyzer["env"]}
    assert env["ISPLIT_ANALYZER_TOKENS_FILE"] == mount["mountPath"] + "/tokens.jsonl" and mount["readOnly"]
    (tmp_path / "tokens.jsonl").write_bytes(base64.b64decode(secret["data"]["tokens.jsonl"]))
    principal = TokenStore(tmp_path / "tokens.jsonl").authenticate(token)
    assert principal is not None and principal.name == "admin" and principal.is_admin


def test_an_existing_token_secret_is_mounted_and_none_is_generated(all_docs):
    assert not find(all_docs, "Secret")
    volume, _ = _auth_volume(all_docs)
    assert volume["secret"]["secretName"] == "isplit-api-tokens"
    assert volume["secret"]["items"] == [{"key": "tokens", "path": "tokens.jsonl"}]


def _tail_serving_pod(docs) -> dict:
    return one(docs, "Deployment", f"{RELEASE}-tail-serving")["spec"]["template"]["spec"]


def test_the_tail_serving_gateway_owns_the_ports_and_reads_both_sets_of_keys(default_docs):
    spec = _tail_serving_pod(default_docs)
    torchserve, gateway = spec["containers"]
    assert [p["name"] for p in torchserve["ports"]] == ["metrics"]
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"inference": 8080, "management": 8081}
    assert gateway["command"] == ["/usr/bin/tini", "--", "python", "-m", "isplit.gateway"]
    args = dict(a.removeprefix("--").split("=", 1) for a in gateway["args"])
    assert args["inference-upstream"] == "http://127.0.0.1:18080"
    assert args["management-upstream"] == "http://127.0.0.1:18081"
    # TorchServe writes key_file.json into its working directory, which the gateway mounts read-only.
    ts_tmp = next(m for m in torchserve["volumeMounts"] if m["mountPath"] == torchserve["workingDir"])
    keys_mount = next(m for m in gateway["volumeMounts"] if m["name"] == ts_tmp["name"])
    assert args["torchserve-key-file"] == keys_mount["mountPath"] + "/key_file.json" and keys_mount["readOnly"]
    auth_mount = next(m for m in gateway["volumeMounts"] if m["name"] == "auth")
    assert args["keys-dir"] == auth_mount["mountPath"] and auth_mount["readOnly"]
    volume = next(v for v in spec["volumes"] if v["name"] == "auth")
    assert volume["secret"]["secretName"] == f"{RELEASE}-tail-serving-auth"
    # Readable by the gateway's user through the pod's fsGroup, by nobody else.
    assert volume["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001


def test_the_chart_generates_tail_serving_keys_the_trainer_gets(default_docs):
    secret = one(default_docs, "Secret", f"{RELEASE}-tail-serving-auth")
    keys = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(keys) == {"inference-key", "management-key"}
    assert all(len(k) == 43 and k.isalnum() for k in keys.values()) and len(set(keys.values())) == 2
    trainer = one(default_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in trainer["env"]}
    assert env["ISPLIT_TORCHSERVE_MANAGEMENT_KEY"] == {"name": f"{RELEASE}-tail-serving-auth", "key": "management-key"}
    assert env["ISPLIT_TORCHSERVE_INFERENCE_KEY"] == {"name": f"{RELEASE}-tail-serving-auth", "key": "inference-key"}


def test_an_existing_tail_serving_key_secret_is_used_and_none_is_generated(all_docs):
    assert not find(all_docs, "Secret")
    volume = next(v for v in _tail_serving_pod(all_docs)["volumes"] if v["name"] == "auth")
    assert volume["secret"]["secretName"] == "isplit-tail-keys"
    trainer = one(all_docs, "Deployment", f"{RELEASE}-trainer")["spec"]["template"]["spec"]["containers"][0]
    refs = [
        e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"] if e["name"].startswith("ISPLIT_TORCHSERVE_")
    ]
    assert refs == ["isplit-tail-keys", "isplit-tail-keys"]


def test_k8s_tools_fetch_is_idempotent_and_fast(helm):
    script = ROOT / "scripts" / "k8s-tools"
    result = subprocess.run([str(script), "fetch"], capture_output=True, text=True, timeout=60, check=True)
    assert "helm:    v" in result.stdout and "kubectl: Client Version: v" in result.stdout
    assert shutil.which("kubectl", path=str(TOOLS_BIN)) is not None


# --- the one-machine cluster overlay (values-local.yaml, skaffold's "local" profile) ---------------


def test_local_values_fit_the_one_node_cluster(helm, tmp_path_factory):
    docs = render(helm, tmp_path_factory, files=[CHART / "values-local.yaml"])
    claims = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claims and all(c["spec"]["storageClassName"] == "isplit-hostpath" for c in claims)
    services = {d["metadata"]["name"]: d["spec"]["type"] for d in docs if d["kind"] == "Service"}
    assert services[f"{RELEASE}-analyzer"] == "NodePort" and services[f"{RELEASE}-tail-serving"] == "NodePort"
    assert config_env(docs, "trainer")["ISPLIT_TRAINER_EXECUTOR"] == "kubernetes"
    assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    cpu = 0.0
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                req = c["resources"]["requests"]["cpu"]
                cpu += float(req[:-1]) / 1000 if req.endswith("m") else float(req)
    job = json.loads(config_env(docs, "trainer")["ISPLIT_TRAINER_JOB_TEMPLATE"])["resources"]["requests"]["cpu"]
    cpu += float(job[:-1]) / 1000 if job.endswith("m") else float(job)
    analysis = render(
        helm, tmp_path_factory, {"analyzer": {"executor": "kubernetes"}}, files=[CHART / "values-local.yaml"]
    )
    env = config_env(analysis, "analyzer")
    pod = json.loads(env["ISPLIT_ANALYZER_JOB_TEMPLATE"])["resources"]["requests"]["cpu"]
    cpu += int(env["ISPLIT_ANALYZER_SHARDS"]) * (float(pod[:-1]) / 1000 if pod.endswith("m") else float(pod))
    assert cpu <= 1.5, f"the services, one training Job and an analysis's shards request {cpu} CPUs of a 2-CPU node"


def test_analyzer_listens_on_every_address_in_the_pod(default_docs):
    assert config_env(default_docs, "analyzer")["ISPLIT_ANALYZER_HOST"] == "0.0.0.0"


def test_the_analyzer_names_its_own_service_account_whatever_the_executor(default_docs):
    """Switching the executor back to inline must not leave pods pointing at a deleted account
    (the API server keeps the deprecated spec.serviceAccount when serviceAccountName is dropped)."""
    spec = one(default_docs, "Deployment", f"{RELEASE}-analyzer")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"{RELEASE}-analyzer"
    assert spec["automountServiceAccountToken"] is False  # no API access inline
    assert one(default_docs, "ServiceAccount", f"{RELEASE}-analyzer")["automountServiceAccountToken"] is False
    assert not find(default_docs, "Role")
