"""skaffold.yaml and the four Dockerfiles it builds (the base image and three thin services).

skaffold.yaml (and each profile applied to it) validates against Skaffold's published JSON
schema for its apiVersion (../shared/schemas/), names Dockerfiles that exist, injects the
built images into chart values that exist, and port-forwards Services the chart renders. The
Dockerfiles are checked statically here: the base holds torch and every dependency behind
build arguments for the Python image and the wheel index; each service image is a thin layer
on it (non-root numeric user, HEALTHCHECK, no compilers, its code installed --no-deps).
``make test-cluster`` builds them for real.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
CHART = ROOT / "charts" / "isplit"
DOCKERFILES = {
    "isplit-analyzer": "services/analyzer/Dockerfile",
    "isplit-trainer": "services/trainer/Dockerfile",
    "isplit-tail-serving": "services/tail-serving/Dockerfile",
}
BASE_DOCKERFILE = "services/base/Dockerfile"
VALUES_KEY = {"isplit-analyzer": "analyzer", "isplit-trainer": "trainer", "isplit-tail-serving": "tailServing"}


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


@pytest.fixture(scope="module")
def schema(skaffold) -> dict:
    version = skaffold["apiVersion"].split("/", 1)[1]
    path = SCHEMAS / f"skaffold-{version}.json"
    assert path.is_file(), f"no schema for {skaffold['apiVersion']} in {SCHEMAS} (expected {path.name})"
    return json.loads(path.read_text())


def apply_patches(config: dict, patches: list[dict]) -> dict:
    """RFC 6902 add/replace/remove, as Skaffold applies a profile's patches."""
    result = copy.deepcopy(config)
    for patch in patches:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in patch["path"].lstrip("/").split("/")]
        node = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if patch["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            if last == "-":
                node.append(patch["value"])
            elif patch["op"] == "add":
                node.insert(int(last), patch["value"])
            else:
                node[int(last)] = patch["value"]
        else:
            assert patch["op"] == "add" or last in node, f"replace of missing {patch['path']}"
            node[last] = patch["value"]
    return result


def profile(skaffold, name) -> dict:
    return next(p for p in skaffold["profiles"] if p["name"] == name)


def release(config) -> dict:
    (only,) = config["deploy"]["helm"]["releases"]
    return only


def test_skaffold_yaml_validates_against_its_schema(skaffold, schema):
    assert skaffold["apiVersion"] in {"skaffold/v4beta13", "skaffold/v4beta14"}
    jsonschema.Draft7Validator(schema).validate(skaffold)


def test_the_schema_check_rejects_a_misspelt_field(skaffold, schema):
    broken = copy.deepcopy(skaffold)
    broken["build"]["artifacts"][0]["docker"]["dockerFile"] = "x"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_each_profile_applied_still_validates(skaffold, schema, name):
    patched = apply_patches(skaffold, profile(skaffold, name)["patches"])
    del patched["profiles"]
    jsonschema.Draft7Validator(schema).validate(patched)


def test_builds_the_base_and_three_images_from_dockerfiles_that_exist(skaffold):
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    assert set(artifacts) == set(DOCKERFILES) | {"isplit-base"}
    for image, dockerfile in {**DOCKERFILES, "isplit-base": BASE_DOCKERFILE}.items():
        artifact = artifacts[image]
        assert artifact["docker"]["dockerfile"] == dockerfile
        assert (ROOT / artifact["context"] / dockerfile).is_file()


def test_each_service_image_requires_the_base_as_its_base_image_argument(skaffold):
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    for image in DOCKERFILES:
        assert artifacts[image]["requires"] == [{"image": "isplit-base", "alias": "BASE_IMAGE"}]
    assert skaffold["build"]["artifacts"][0]["image"] == "isplit-base", "built first"


def test_local_profile_uses_the_legacy_builder_the_registry_and_the_local_values(skaffold):
    local = apply_patches(skaffold, profile(skaffold, "local")["patches"])
    assert local["build"]["local"]["useBuildkit"] is False and local["build"]["local"]["push"] is True
    networks = {a["image"]: a["docker"].get("network") for a in local["build"]["artifacts"]}
    assert networks["isplit-base"] == "host" and networks["isplit-tail-serving"] == "host"  # pip, apt
    base = next(a for a in local["build"]["artifacts"] if a["image"] == "isplit-base")
    assert base["docker"]["buildArgs"]["PYTHON_IMAGE"] == "isplit-python:bookworm"
    assert release(local)["valuesFiles"][-1] == "charts/isplit/values-local.yaml"
    assert "kafka.bootstrapServers" not in release(local)["setValues"], "values-local.yaml names the broker"
    local_values = yaml.safe_load((CHART / "values-local.yaml").read_text())
    assert local_values["trainer"]["executor"] == "kubernetes"


def test_built_images_are_injected_into_chart_values_that_exist(skaffold):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    templates = release(skaffold)["setValueTemplates"]
    for image, key in VALUES_KEY.items():
        variable = image.replace("-", "_")
        assert templates[f"{key}.image.repository"] == f"{{{{.IMAGE_REPO_{variable}}}}}"
        assert templates[f"{key}.image.tag"] == f"{{{{.IMAGE_TAG_{variable}}}}}@{{{{.IMAGE_DIGEST_{variable}}}}}"
        assert values[key]["image"]["repository"] == image
    for dotted in list(templates) + list(release(skaffold)["setValues"]):
        node = values
        for part in dotted.split("."):
            assert isinstance(node, dict) and part in node, f"{dotted} is not a chart value"
            node = node[part]


def test_deploys_the_chart_with_helm(skaffold):
    chart = release(skaffold)
    assert (ROOT / chart["chartPath"] / "Chart.yaml").is_file()
    for values_file in chart["valuesFiles"]:
        assert (ROOT / values_file).is_file()


def test_port_forwards_the_analyzer_and_torchserve_services_the_chart_renders(skaffold):
    chart = release(skaffold)
    helm = ROOT / ".tools" / "bin" / "helm"
    if not helm.exists():
        subprocess.run([str(ROOT / "scripts" / "k8s-tools"), "fetch"], check=True, timeout=600)
    rendered = subprocess.run(
        [str(helm), "template", chart["name"], str(ROOT / chart["chartPath"]), "--namespace", chart["namespace"]],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    services = {
        doc["metadata"]["name"]: {p["port"] for p in doc["spec"]["ports"]}
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] == "Service"
    }
    forwards = {(f["resourceName"], f["port"], f["localPort"]) for f in skaffold["portForward"]}
    assert forwards == {("isplit-analyzer", 8000, 8000), ("isplit-tail-serving", 8080, 8080)}
    for forward in skaffold["portForward"]:
        assert forward["resourceType"] == "service"
        assert forward["namespace"] == chart["namespace"]
        assert forward["port"] in services[forward["resourceName"]]


def test_cpu_profile_is_the_base_config(skaffold):
    cpu = apply_patches(skaffold, profile(skaffold, "cpu")["patches"])
    assert cpu["build"] == skaffold["build"]
    assert release(cpu)["setValues"]["trainer.device"] == "cpu"
    assert "charts/isplit/values-gpu.yaml" not in release(cpu)["valuesFiles"]


def test_gpu_profile_uses_the_gpu_values_on_the_same_images(skaffold):
    gpu = apply_patches(skaffold, profile(skaffold, "gpu")["patches"])
    assert gpu["build"] == skaffold["build"], "PyPI's torch in the base image is the CUDA build"
    assert release(gpu)["valuesFiles"][-1] == "charts/isplit/values-gpu.yaml"
    gpu_values = yaml.safe_load((CHART / "values-gpu.yaml").read_text())
    assert gpu_values["trainer"]["gpu"]["count"] >= 1


# --- Dockerfiles ----------------------------------------------------------------------------------


def stages(dockerfile: str) -> list[list[str]]:
    """Logical lines (continuations joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    groups: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            groups.append([])
        groups[-1].append(line)
    return groups


def build_args(dockerfile: str) -> dict[str, str]:
    args = {}
    for line in stages(dockerfile)[0]:
        match = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2)
    return args


def test_base_image_has_build_args_for_the_python_image_and_the_wheel_index():
    text = (ROOT / BASE_DOCKERFILE).read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.M))
    assert args["PYTHON_IMAGE"] == "isplit-python:bookworm", "what scripts/cluster makes with debootstrap"
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert "ARG TORCH_INDEX_URL=" in text and "${TORCH_INDEX_URL:-$PIP_INDEX_URL}" in text
    for package in ("torch", "torchvision", "torchserve", "torch-model-archiver"):
        assert f'"{package}>=' in text
    # Dependencies come from the packages' own pyproject files, not a second list.
    for pyproject in ("shared", "services/analyzer", "services/trainer"):
        assert f"COPY {pyproject}/pyproject.toml" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values())
def test_service_image_is_a_thin_layer_on_the_base(dockerfile):
    groups = stages(dockerfile)
    assert len(groups) == 2, "one stage: FROM the base"
    assert groups[1][0] == "FROM ${BASE_IMAGE}"
    assert build_args(dockerfile)["BASE_IMAGE"] == "isplit-base:latest"
    final = " ".join(groups[1])
    assert "pip install --no-deps --no-build-isolation /src/shared" in final
    assert "torch>=" not in final, "torch lives in the base image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values())
def test_final_stage_runs_as_non_root_with_a_healthcheck(dockerfile):
    final = stages(dockerfile)[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid (runAsNonRoot can check it)"
    assert any(line.upper().startswith("HEALTHCHECK ") for line in final)


@pytest.mark.parametrize("dockerfile", DOCKERFILES.values())
def test_final_stage_has_no_build_tools(dockerfile):
    final = " ".join(stages(dockerfile)[-1])
    for tool in ("build-essential", "gcc", "g++", "make ", "cmake", "-dev ", "git ", "curl ", "wget "):
        assert tool not in final, f"{tool.strip()} in the final stage"


def test_analyzer_image_listens_on_every_address():
    text = (ROOT / DOCKERFILES["isplit-analyzer"]).read_text()
    assert "ISPLIT_ANALYZER_HOST=0.0.0.0" in text


def test_trainer_image_has_the_tail_handler():
    text = (ROOT / DOCKERFILES["isplit-trainer"]).read_text()
    assert "ISPLIT_TAIL_HANDLER=" in text


def test_tail_serving_image_is_torchserve_with_the_isplit_handler():
    final = " ".join(stages(DOCKERFILES["isplit-tail-serving"])[-1])
    assert "COPY services/tail-serving/isplit_tail_handler.py" in final
    assert '"torchserve"' in final and "openjdk-17-jre-headless" in final
    assert "EXPOSE 8080 8081 8082" in final


def test_dockerignore_keeps_the_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".tools", "var", "tests", "charts", "**/__pycache__"} <= ignored
    assert "shared" not in ignored and "services" not in ignored
