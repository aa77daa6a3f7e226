"""The Kubernetes manifests and Dockerfiles: rendered, schema-checked, linted, and in agreement
with the code they deploy.

- `kubectl kustomize` renders k8s/overlays/dev, k8s/overlays/gpu and "gpu-all" (the gpu overlay
  plus every optional component in k8s/components/); k8s/jobs/ is read as is.
- kubernetes-validate checks every resource against the Kubernetes KUBERNETES_VERSION schemas
  (strict: unknown fields are errors).
- checkov scans the rendered manifests and docker/*.Dockerfile; every finding must be listed,
  with its reason, in k8s/checkov-skips.yaml, and every entry there must still match a finding.
- Agreement with the code: container ports, probe ports and Service ports equal each service's
  default ports (services/<name>/settings.py); the environment each container gets is exactly
  what its settings read (ENV_VARS), and parses with the service's own settings class; the probes
  ask for the health names the server registers (ffnskip/rpc/server.py); the grace period covers
  the drain; the recalibration jobs parse with the real `ffnskip` CLI and target the calibrator.

Nothing is skipped: without kubectl, kubernetes-validate or checkov (all installed by
`make setup`) the tests fail and say what is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

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
OPTIONAL_COMPONENTS = ("managed-redis", "gateway-tls", "gateway-ingress")  # calibrator-gpu: in gpu
VARIANTS = ("dev", "gpu", "gpu-all")
GPU_VARIANTS = ("gpu", "gpu-all")
SERVICE_PROBE_NAMES = {LIVENESS, READINESS}

# Settings a container may leave at the service's default, and why. Everything else in a
# service's ENV_VARS must be set by the manifests (a new setting fails here until it is wired).
UNSET_ON_PURPOSE = {
    "FFNSKIP_REDIS_DB": "the database number is part of FFNSKIP_REDIS_URL",
    "FFNSKIP_TLS_CERT": "gateway TLS is optional: components/gateway-tls sets it",
    "FFNSKIP_TLS_KEY": "gateway TLS is optional: components/gateway-tls sets it",
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

def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make setup` installs it (docs/ops.md, 'Tools'); "
                    "these tests render k8s/overlays/* with `kubectl kustomize` and skip nothing")
    return kubectl


def _kustomize(directory: Path) -> list[dict]:
    proc = subprocess.run([_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """variant -> resources. "gpu-all" is the gpu overlay with every optional component."""
    out = {name: _kustomize(K8S / "overlays" / name) for name in OVERLAYS}
    everything = tmp_path_factory.mktemp("gpu-all")
    up = Path(os.path.relpath(K8S, everything))
    (everything / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
        "resources": [str(up / "overlays" / "gpu")],
        "components": [str(up / "components" / c) for c in OPTIONAL_COMPONENTS],
    }))
    out["gpu-all"] = _kustomize(everything)
    out["recalibrate-job"] = [doc for doc in yaml.safe_load_all((K8S / "jobs" / "recalibrate-job.yaml").read_text()) if doc]
    return out


def _find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"].get("name") == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def _container(docs: list[dict], service: str) -> dict:
    deployment = _find(docs, "Deployment", f"ffnskip-{service}")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert service in containers, f"Deployment ffnskip-{service} has no container named {service}"
    return containers[service]


# ------------------------------------------------------------------------------ the services

@functools.lru_cache(maxsize=None)
def _settings_class(service: str) -> type:
    module = importlib.import_module(f"services.{service}.settings")
    classes = [obj for obj in vars(module).values()
               if isinstance(obj, type) and obj.__module__ == module.__name__ and hasattr(obj, "from_env")]
    assert len(classes) == 1, f"services.{service}.settings should define one settings class with from_env"
    return classes[0]


def _env_vars(service: str) -> set[str]:
    return set(importlib.import_module(f"services.{service}.settings").ENV_VARS)


def _default(service: str, attribute: str) -> Any:
    """A setting's default: the dataclass field default, else from_env({})."""
    cls = _settings_class(service)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if attribute in fields and fields[attribute].default is not dataclasses.MISSING:
        return fields[attribute].default
    return getattr(cls.from_env({}), attribute)


def _configmap_data(docs: list[dict], name: str) -> dict[str, str]:
    return dict(_find(docs, "ConfigMap", name).get("data", {}))


def _container_env(docs: list[dict], container: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(environment as the process would see it, with fake values for Secrets and the downward
    API; name -> where it comes from: configmap, secret, field or value)."""
    env: dict[str, str] = {}
    source: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        assert "secretRef" not in ref, "envFrom secretRef hides the variable names; use secretKeyRef per variable"
        data = _configmap_data(docs, ref["configMapRef"]["name"])
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
        else:
            pytest.fail(f"{container['name']}: env {name} has an unsupported source {item}")
    return env, source


def _service_env(docs: list[dict], service: str) -> tuple[dict[str, str], dict[str, str]]:
    return _container_env(docs, _container(docs, service))


def _settings(docs: list[dict], service: str) -> Any:
    env, _ = _service_env(docs, service)
    return _settings_class(service).from_env(env)


def _grpc_port(container: dict) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert "grpc" in ports, f"{container['name']}: no container port named grpc"
    return ports["grpc"]


# ---------------------------------------------------------------------------------- checks

@pytest.mark.parametrize("variant", VARIANTS)
def test_overlay_renders_every_part(rendered, variant):
    docs = rendered[variant]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for service in SERVICES:
        assert ("Deployment", f"ffnskip-{service}") in kinds
    for expected in [("Namespace", NAMESPACE), ("Service", "ffnskip-gateway"), ("Service", "ffnskip-calibrator"),
                     ("PersistentVolumeClaim", "ffnskip-model-cache"), ("CronJob", "ffnskip-recalibrate"),
                     ("NetworkPolicy", "ffnskip-default-deny"), ("PodDisruptionBudget", "ffnskip-decoder")]:
        assert expected in kinds, f"{variant}: {expected} missing"
    redis_in_cluster = ("StatefulSet", "ffnskip-redis") in kinds
    assert redis_in_cluster == (variant != "gpu-all"), "only the managed-redis variant drops the in-cluster Redis"
    autoscaled = {("HorizontalPodAutoscaler", "ffnskip-decoder"), ("HorizontalPodAutoscaler", "ffnskip-gateway")}
    assert (autoscaled <= kinds) == (variant in GPU_VARIANTS)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{variant}: {doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("variant", [*VARIANTS, "recalibrate-job"])
def test_every_resource_matches_the_kubernetes_schema(rendered, variant):
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: `make setup` installs the [test] extra")
    errors = []
    for doc in rendered[variant]:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            errors.append(f"{doc['kind']} {name}: {getattr(exc, 'message', exc)}")
    assert not errors, f"{variant}: {len(errors)} schema errors (Kubernetes {KUBERNETES_VERSION}):\n" + "\n".join(errors)


# -------------------------------------------------------------------------------- checkov

def _checkov() -> str:
    for candidate in (ROOT / ".venv-tools" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("checkov is not installed: `make tools` puts it in .venv-tools/ (`make test` runs it)")


@pytest.fixture(scope="module")
def checkov_report(rendered, tmp_path_factory) -> list[dict]:
    scan = tmp_path_factory.mktemp("checkov")
    for variant in (*VARIANTS, "recalibrate-job"):
        (scan / f"{variant}.yaml").write_text(yaml.safe_dump_all(rendered[variant], sort_keys=False))
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert {p.name for p in dockerfiles} == {f"{s}.Dockerfile" for s in SERVICES}
    for path in dockerfiles:
        shutil.copy(path, scan / path.name)
    proc = subprocess.run([_checkov(), "--directory", str(scan), "--framework", "kubernetes", "dockerfile",
                           "--output", "json", "--compact", "--skip-download", "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=scan)
    assert proc.returncode in (0, 1), f"checkov failed to run (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    return report if isinstance(report, list) else [report]


def _target(file_path: str) -> str:
    name = Path(file_path).name
    return "dockerfile" if name.endswith(".Dockerfile") else name.removesuffix(".yaml")


def test_checkov_finds_nothing_unexplained(checkov_report):
    skips = yaml.safe_load(SKIPS_FILE.read_text())["skips"]
    for skip in skips:
        assert skip.get("reason", "").strip(), f"{skip['id']}: every skip needs a reason"
    frameworks = {r["check_type"]: r for r in checkov_report}
    assert set(frameworks) == {"kubernetes", "dockerfile"}, f"checkov scanned {set(frameworks)}"
    for framework, report in frameworks.items():
        assert report["summary"]["parsing_errors"] == 0, f"checkov could not parse some {framework} files"
    assert frameworks["dockerfile"]["summary"]["resource_count"] == len(SERVICES)
    assert frameworks["kubernetes"]["summary"]["resource_count"] >= 80

    used: set[str] = set()
    unexplained = []
    for report in frameworks.values():
        for finding in report["results"]["failed_checks"]:
            target = _target(finding["file_path"])
            matching = [s for s in skips if s["id"] == finding["check_id"] and target in s.get("targets", [target])]
            if matching:
                used.add(finding["check_id"])
            else:
                unexplained.append(f"{finding['check_id']} ({finding['check_name']}) in {target}: {finding['resource']}")
    assert not unexplained, "checkov findings not explained in k8s/checkov-skips.yaml:\n" + "\n".join(sorted(unexplained))
    stale = {s["id"] for s in skips} - used
    assert not stale, f"k8s/checkov-skips.yaml lists checks checkov no longer reports: {sorted(stale)}"


# ------------------------------------------------------------------- agreement with the code

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_ports_match_the_settings(rendered, variant, service):
    docs = rendered[variant]
    container = _container(docs, service)
    port = _grpc_port(container)
    assert port == _default(service, "port"), f"{service}: container port {port} != the settings' default"
    assert _settings(docs, service).port == port, f"{service}: the configured port differs from the container port"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if hasattr(_settings(docs, service), "metrics_port"):  # (the decoder's default is 0 = off locally)
        assert ports.get("metrics") == _settings(docs, service).metrics_port
    if service != "decoder":  # decoders are reached by pod IP from the registry, not a Service
        svc = _find(docs, "Service", f"ffnskip-{service}")
        for entry in svc["spec"]["ports"]:
            assert entry["targetPort"] in ports and entry["port"] == ports[entry["targetPort"]], entry


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_environment_is_exactly_what_the_service_reads(rendered, variant, service):
    docs = rendered[variant]
    container = _container(docs, service)
    env, source = _service_env(docs, service)
    known = _env_vars(service)
    helpers = {name for name in env if not name.startswith("FFNSKIP_")}
    unknown = {name for name in env if name.startswith("FFNSKIP_")} - known
    assert not unknown, f"{service} does not read {sorted(unknown)} (settings.ENV_VARS)"
    literal_values = " ".join(item.get("value", "") for item in container.get("env", []))
    for helper in helpers:  # e.g. POD_IP: only to build another value from the downward API
        assert source[helper] == "field" and f"$({helper})" in literal_values, f"{service}: stray variable {helper}"
    missing_required = REQUIRED[service] - set(env)
    assert not missing_required, f"{service}: {sorted(missing_required)} must be set"
    unset = known - set(env) - set(UNSET_ON_PURPOSE)
    assert not unset, f"{service} reads {sorted(unset)} but the manifests do not set them (or list them in UNSET_ON_PURPOSE)"
    for name in FROM_SECRETS & set(env):
        assert source[name] == "secret", f"{service}: {name} must come from a Secret, not {source[name]}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_configuration_parses_with_the_service_settings(rendered, variant, service):
    settings = _settings(rendered[variant], service)  # raises on any value the service refuses
    assert settings.host == "0.0.0.0", f"{service} must listen on all interfaces in a pod"
    if service == "decoder":
        assert settings.advertise_address == f"{FAKE_FIELDS['status.podIP']}:{settings.port}"
        env = _container(rendered[variant], "decoder")["env"]
        names = [item["name"] for item in env]
        assert names.index("POD_IP") < names.index("FFNSKIP_ADVERTISE_ADDRESS"), "$(POD_IP) must be defined first"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_probes_ask_the_health_service(rendered, variant, service):
    docs = rendered[variant]
    container = _container(docs, service)
    port = _grpc_port(container)
    tls = bool(getattr(_settings(docs, service), "tls_cert", None))
    expected = {"startupProbe": LIVENESS, "readinessProbe": READINESS, "livenessProbe": LIVENESS}
    for probe_name, health_name in expected.items():
        probe = container.get(probe_name)
        assert probe, f"{service}: no {probe_name}"
        if tls:  # the kubelet's gRPC probes cannot speak TLS
            assert probe.get("tcpSocket", {}).get("port") == port, f"{service}: {probe_name} with TLS"
            continue
        grpc = probe.get("grpc")
        assert grpc, f"{service}: {probe_name} must be a native gRPC probe"
        assert isinstance(grpc["port"], int) and grpc["port"] == port
        assert grpc.get("service") in SERVICE_PROBE_NAMES and grpc["service"] == health_name, grpc
    if service == "decoder":  # model loading takes minutes before the server answers at all
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_grace_period_covers_the_drain(rendered, variant, service):
    docs = rendered[variant]
    pod = _find(docs, "Deployment", f"ffnskip-{service}")["spec"]["template"]["spec"]
    pre_stop = _container(docs, service).get("lifecycle", {}).get("preStop", {})
    sleep = int(pre_stop["exec"]["command"][-1]) if pre_stop.get("exec", {}).get("command", [""])[0] == "sleep" else 0
    drain = _settings(docs, service).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 30, f"{service}: drain {drain} s, preStop {sleep} s"


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoders_and_gateway_agree(rendered, variant):
    docs = rendered[variant]
    decoder, gateway = _settings(docs, "decoder"), _settings(docs, "gateway")
    assert gateway.max_new_tokens <= decoder.max_new_tokens_cap, "the gateway would pass requests decoders refuse"
    calibrator = _settings(docs, "calibrator")
    assert decoder.model_name in calibrator.models, "profiles are stored under the calibrated model id"
    assert decoder.model == decoder.model_name


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_gpu_placement(rendered, variant):
    docs = rendered[variant]
    pod = _find(docs, "Deployment", "ffnskip-decoder")["spec"]["template"]["spec"]
    container = _container(docs, "decoder")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/home/ffnskip/.cache"]]["persistentVolumeClaim"]["claimName"] == "ffnskip-model-cache"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    if variant == "dev":
        text = yaml.safe_dump_all(docs)
        assert "nvidia" not in text, "the dev overlay must not ask for GPUs, GPU nodes or the NVIDIA runtime"
        assert _settings(docs, "decoder").device == "cpu"
        return
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert any(e["key"] == "nvidia.com/gpu.product" for t in terms for e in t["matchExpressions"])
    assert _settings(docs, "decoder").device.startswith("cuda")


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_autoscaling(rendered, variant):
    docs = rendered[variant]
    metrics = _find(docs, "HorizontalPodAutoscaler", "ffnskip-decoder")["spec"]["metrics"]
    custom = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert custom == ["ffnskip_num_requests_waiting"], "queue depth, with prometheus-adapter's ':' -> '_'"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics), "CPU fallback"
    gateway = _find(docs, "HorizontalPodAutoscaler", "ffnskip-gateway")["spec"]
    assert gateway["scaleTargetRef"]["name"] == "ffnskip-gateway"


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _pod_labels(docs: list[dict]) -> dict[str, dict]:
    out = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            out[doc["metadata"]["name"]] = doc["spec"]["template"]["metadata"]["labels"]
        elif doc["kind"] == "CronJob":
            out[doc["metadata"]["name"]] = doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return out


def _allowed_sources(docs: list[dict], target: str, port: int) -> set[str]:
    """Workloads of the namespace whose pods may open `port` on `target`'s pods."""
    pods = _pod_labels(docs)
    sources: set[str] = set()
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        if "Ingress" not in spec["policyTypes"] or not _selects(spec["podSelector"], pods[target]):
            continue
        for rule in spec.get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            peers = rule.get("from")
            if not peers:
                sources.add("*")
            for peer in peers or []:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    sources |= {name for name, labels in pods.items() if _selects(peer["podSelector"], labels)}
                else:
                    sources.add("outside")
    return sources


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies(rendered, variant):
    docs = rendered[variant]
    deny = _find(docs, "NetworkPolicy", "ffnskip-default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny
    assert _allowed_sources(docs, "ffnskip-decoder", 50052) == {"ffnskip-gateway"}, "only the gateway reaches decoders"
    assert _allowed_sources(docs, "ffnskip-calibrator", 50053) == {"ffnskip-recalibrate"}
    if variant != "gpu-all":
        assert _allowed_sources(docs, "ffnskip-redis", 6379) == {f"ffnskip-{s}" for s in SERVICES}, \
            "only the services reach Redis"


def _job_pod(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    return spec


@pytest.mark.parametrize("variant", [*VARIANTS, "recalibrate-job"])
def test_recalibration_job_runs_the_cli_against_the_calibrator(rendered, variant, monkeypatch):
    from ffnskip import cli

    docs = rendered[variant]
    job = next(d for d in docs if d["kind"] in ("CronJob", "Job") and d["metadata"].get("labels", {})
               .get("app.kubernetes.io/component") == "recalibrate")
    spec = _job_pod(job)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    fail_fast = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    assert any(r["onExitCodes"]["values"] == [1] and r["onExitCodes"]["operator"] == "In" for r in fail_fast), \
        "a failed calibration (CLI exit 1) must fail the Job without retries"
    (container,) = pod["containers"]
    env, _ = _container_env(docs, container)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in [*container["command"][1:], *container["args"]]]
    assert container["command"][0] == "ffnskip"
    monkeypatch.delenv("FFNSKIP_CALIBRATOR_ADDRESS", raising=False)
    if "FFNSKIP_CALIBRATOR_ADDRESS" in env:
        monkeypatch.setenv("FFNSKIP_CALIBRATOR_ADDRESS", env["FFNSKIP_CALIBRATOR_ADDRESS"])
    args = cli.build_parser().parse_args(argv)
    assert args.command == "ops" and args.handler.__name__ == "_submit", argv
    assert args.wait and args.activate and args.idempotency_key == FAKE_FIELDS[
        "metadata.labels['batch.kubernetes.io/job-name']"]
    calibrator_port = _default("calibrator", "port")
    assert args.address == f"ffnskip-calibrator:{calibrator_port}"
    if variant != "recalibrate-job":
        _find(docs, "Service", "ffnskip-calibrator")
        assert args.model in _settings(docs, "calibrator").models


def _pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"].get("name") or doc["metadata"]["generateName"], doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc["metadata"]["name"], doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("variant", [*VARIANTS, "recalibrate-job"])
def test_pods_are_locked_down(rendered, variant):
    accounts = {d["metadata"]["name"]: d for d in rendered[variant] if d["kind"] == "ServiceAccount"}
    for name, pod in _pod_specs(rendered[variant]):
        assert pod["automountServiceAccountToken"] is False, name
        if variant != "recalibrate-job":
            assert accounts[pod["serviceAccountName"]]["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name}: {kind}"
