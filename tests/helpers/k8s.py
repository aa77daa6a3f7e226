"""What the Kubernetes manifest tests share: the rendered overlays (`rendered` fixture),
lookups into them, and each service's settings as the code defines them."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ffnskip.rpc.server import LIVENESS, READINESS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKER = ROOT / "docker"
SKIPS_FILE = K8S / "checkov-skips.yaml"
KUBERNETES_VERSION = "1.32"  # the schema version every rendered resource must validate against
NAMESPACE = "ffnskip"
SERVICES = ("calibrator", "decoder", "gateway")
OVERLAYS = ("dev", "gpu")
# calibrator-gpu and gateway-http-ingress: in gpu. gateway-tls last: it patches the ingresses.
OPTIONAL_COMPONENTS = ("managed-redis", "gateway-ingress", "gateway-tls")
VARIANTS = ("dev", "gpu", "gpu-all")
GPU_VARIANTS = ("gpu", "gpu-all")
SERVICE_PROBE_NAMES = {LIVENESS, READINESS}

# Settings a container may leave at the service's default, and why. Everything else in a
# service's ENV_VARS must be set by the manifests (a new setting fails here until it is wired).
UNSET_ON_PURPOSE = {
    "FFNSKIP_REDIS_DB": "the database number is part of FFNSKIP_REDIS_URL",
    "FFNSKIP_TLS_CERT": "gateway TLS (gRPC and HTTP ports) is optional: components/gateway-tls sets it",
    "FFNSKIP_TLS_KEY": "gateway TLS (gRPC and HTTP ports) is optional: components/gateway-tls sets it",
}
REQUIRED = {  # must be set in every variant, whatever the defaults say
    "calibrator": {"FFNSKIP_REDIS_URL", "FFNSKIP_REDIS_PASSWORD", "FFNSKIP_MODELS", "FFNSKIP_DRAIN_TIMEOUT_S"},
    "decoder": {"FFNSKIP_REDIS_URL", "FFNSKIP_REDIS_PASSWORD", "FFNSKIP_DECODER_HOST", "FFNSKIP_ADVERTISE_ADDRESS",
                "FFNSKIP_MODEL", "FFNSKIP_MODEL_NAME", "FFNSKIP_DRAIN_TIMEOUT_S"},
    "gateway": {"FFNSKIP_REDIS_URL", "FFNSKIP_REDIS_PASSWORD", "FFNSKIP_API_KEYS", "FFNSKIP_OPS_KEYS",
                "FFNSKIP_DRAIN_TIMEOUT_S"},
}
FROM_SECRETS = {"FFNSKIP_REDIS_PASSWORD", "FFNSKIP_API_KEYS", "FFNSKIP_OPS_KEYS"}  # never a ConfigMap value
FAKE_FIELDS = {"status.podIP": "10.1.2.3", "metadata.name": "ffnskip-pod-abc12",
               "metadata.labels['batch.kubernetes.io/job-name']": "ffnskip-recalibrate-abc12"}
FAKE_SECRETS = {"url": "rediss://redis.test:6380/0"}  # by Secret key; anything else gets FAKE_SECRET
FAKE_SECRET = "test-secret-value"


# ---------------------------------------------------------------------------------- rendering

def kubectl_path() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make setup` installs it (docs/ops.md, 'Tools'); "
                    "these tests render k8s/overlays/* with `kubectl kustomize` and skip nothing")
    return kubectl


def kustomize(directory: Path) -> list[dict]:
    proc = subprocess.run([kubectl_path(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """variant -> resources. "gpu-all" is the gpu overlay with every optional component."""
    out = {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    everything = tmp_path_factory.mktemp("gpu-all")
    up = Path(os.path.relpath(K8S, everything))
    (everything / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
        "resources": [str(up / "overlays" / "gpu")],
        "components": [str(up / "components" / c) for c in OPTIONAL_COMPONENTS],
    }))
    out["gpu-all"] = kustomize(everything)
    out["recalibrate-job"] = [doc for doc in yaml.safe_load_all((K8S / "jobs" / "recalibrate-job.yaml").read_text()) if doc]
    return out


def find_one(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"].get("name") == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def service_container(docs: list[dict], service: str) -> dict:
    deployment = find_one(docs, "Deployment", f"ffnskip-{service}")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert service in containers, f"Deployment ffnskip-{service} has no container named {service}"
    return containers[service]


# ------------------------------------------------------------------------------ the services

@functools.cache
def settings_class(service: str) -> type:
    module = importlib.import_module(f"services.{service}.settings")
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and obj.__module__ == module.__name__ and hasattr(obj, "from_env")]
    assert len(classes) == 1, f"services.{service}.settings should define one settings class with from_env"
    return classes[0]


def env_vars_of(service: str) -> set[str]:
    return set(importlib.import_module(f"services.{service}.settings").ENV_VARS)


def settings_default(service: str, attribute: str) -> Any:
    """A setting's default: the dataclass field default, else from_env({})."""
    cls = settings_class(service)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if attribute in fields and fields[attribute].default is not dataclasses.MISSING:
        return fields[attribute].default
    return getattr(cls.from_env({}), attribute)


def configmap_data(docs: list[dict], name: str) -> dict[str, str]:
    return dict(find_one(docs, "ConfigMap", name).get("data", {}))


def container_env(docs: list[dict], container: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(environment as the process would see it, with fake values for Secrets and the downward
    API; name -> where it comes from: configmap, secret, field or value)."""
    env: dict[str, str] = {}
    source: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        assert "secretRef" not in ref, "envFrom secretRef hides the variable names; use secretKeyRef per variable"
        data = configmap_data(docs, ref["configMapRef"]["name"])
        for key, value in data.items():
            env[key], source[key] = value, "configmap"
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
            source[name] = "value"
        elif "secretKeyRef" in item.get("valueFrom", {}):
            key = item["valueFrom"]["secretKeyRef"]["key"]
            env[name], source[name] = FAKE_SECRETS.get(key, FAKE_SECRET), "secret"
        elif "fieldRef" in item.get("valueFrom", {}):
            env[name], source[name] = FAKE_FIELDS[item["valueFrom"]["fieldRef"]["fieldPath"]], "field"
        elif "resourceFieldRef" in item.get("valueFrom", {}):
            env[name], source[name] = resource_field(container, item["valueFrom"]["resourceFieldRef"]), "resource"
        else:
            pytest.fail(f"{container['name']}: env {name} has an unsupported source {item}")
    return env, source


def resource_field(container: dict, ref: dict) -> str:
    """What the downward API gives for a container's CPU request or limit: the quantity in units
    of `divisor`, rounded up (a container without that limit would get the node's CPUs)."""
    assert ref.get("containerName") == container["name"], f"{ref} names another container"
    kind, _, resource = ref["resource"].partition(".")
    assert resource == "cpu", f"{ref}: only CPU quantities are modelled here"
    quantity = container["resources"][{"limits": "limits", "requests": "requests"}[kind]]["cpu"]

    def cores(text: str) -> float:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)

    return str(math.ceil(cores(str(quantity)) / cores(str(ref.get("divisor", "1")))))


def service_env(docs: list[dict], service: str) -> tuple[dict[str, str], dict[str, str]]:
    return container_env(docs, service_container(docs, service))


def service_settings(docs: list[dict], service: str) -> Any:
    env, _ = service_env(docs, service)
    return settings_class(service).from_env(env)


def grpc_port_of(container: dict) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert "grpc" in ports, f"{container['name']}: no container port named grpc"
    return ports["grpc"]
