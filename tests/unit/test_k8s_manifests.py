"""The Kubernetes manifests and Dockerfiles: rendered, schema-checked, linted, and in agreement
with the code they deploy.

- `kubectl kustomize` renders k8s/overlays/dev, k8s/overlays/gpu and "gpu-all" (the gpu overlay
  plus every optional component in k8s/components/); k8s/jobs/ is read as is.
- kubernetes-validate checks every resource against the Kubernetes KUBERNETES_VERSION schemas
  (strict: unknown fields are errors).
- checkov scans the rendered manifests and docker/*.Dockerfile; every finding must be listed,
  with its reason, in k8s/checkov-skips.yaml, and every entry there must still match a finding.
- Structure: GPU placement of the decoders, autoscaling, network policies, locked-down pods.
  Agreement with the code (ports, environment, probes, drain, jobs): test_k8s_agreement.py.

Nothing is skipped: without kubectl, kubernetes-validate or checkov (all installed by
`make setup`) the tests fail and say what is missing.
"""


from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.k8s import (  # noqa: F401 (rendered is a fixture)
    DOCKER,
    GPU_VARIANTS,
    KUBERNETES_VERSION,
    NAMESPACE,
    ROOT,
    SERVICES,
    SKIPS_FILE,
    VARIANTS,
    find_one,
    rendered,
    service_container,
    service_settings,
)

pytestmark = pytest.mark.heavy  # kubectl renders, checkov scans: minutes


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoder_gpu_placement(rendered, variant):
    docs = rendered[variant]
    pod = find_one(docs, "Deployment", "ffnskip-decoder")["spec"]["template"]["spec"]
    container = service_container(docs, "decoder")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["/home/ffnskip/.cache"]]["persistentVolumeClaim"]["claimName"] == "ffnskip-model-cache"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    if variant == "dev":
        text = yaml.safe_dump_all(docs)
        assert "nvidia" not in text, "the dev overlay must not ask for GPUs, GPU nodes or the NVIDIA runtime"
        assert service_settings(docs, "decoder").device == "cpu"
        return
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert any(e["key"] == "nvidia.com/gpu.product" for t in terms for e in t["matchExpressions"])
    assert service_settings(docs, "decoder").device.startswith("cuda")


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_autoscaling(rendered, variant):
    docs = rendered[variant]
    metrics = find_one(docs, "HorizontalPodAutoscaler", "ffnskip-decoder")["spec"]["metrics"]
    custom = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert custom == ["ffnskip_num_requests_waiting"], "queue depth, with prometheus-adapter's ':' -> '_'"
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics), "CPU fallback"
    gateway = find_one(docs, "HorizontalPodAutoscaler", "ffnskip-gateway")["spec"]
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
    """Who may open `port` on `target`'s pods: workloads of the namespace by name, "*" (any
    source), or a peer outside it as "namespace:<selector>" / "ipBlock:<cidr>"."""
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
                elif "ipBlock" in peer:
                    sources.add(f"ipBlock:{json.dumps(peer['ipBlock'], sort_keys=True)}")
                else:
                    sources.add(f"namespace:{json.dumps(peer, sort_keys=True)}")
    return sources


def _gateway_ingress_rules(docs: list[dict]) -> list[dict]:
    pods = _pod_labels(docs)
    return [rule for policy in docs if policy["kind"] == "NetworkPolicy" and "Ingress" in policy["spec"]["policyTypes"]
            and _selects(policy["spec"]["podSelector"], pods["ffnskip-gateway"]) for rule in policy["spec"].get("ingress", [])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies(rendered, variant):
    docs = rendered[variant]
    deny = find_one(docs, "NetworkPolicy", "ffnskip-default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny
    assert _allowed_sources(docs, "ffnskip-decoder", 50052) == {"ffnskip-gateway"}, "only the gateway reaches decoders"
    http_port = service_settings(docs, "gateway").http_port
    assert http_port and _allowed_sources(docs, "ffnskip-gateway", http_port) == _allowed_sources(
        docs, "ffnskip-gateway", 50051), "the HTTP API is reachable exactly where the gRPC API is"
    for rule in _gateway_ingress_rules(docs):  # one rule for both, so narrowing one narrows the other
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports and (http_port in ports) == (50051 in ports), f"a rule admits one public port alone: {rule}"
    if variant in GPU_VARIANTS:  # the HTTP ingress's controller runs in another namespace: it must get in
        sources = _allowed_sources(docs, "ffnskip-gateway", http_port)
        assert "*" in sources or any(s.startswith("namespace:") for s in sources), sources
    assert _allowed_sources(docs, "ffnskip-calibrator", 50053) == {"ffnskip-recalibrate"}
    if variant != "gpu-all":
        assert _allowed_sources(docs, "ffnskip-redis", 6379) == {f"ffnskip-{s}" for s in SERVICES}, \
            "only the services reach Redis"


@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_the_http_api_has_a_tls_ingress(rendered, variant):
    """The gpu overlay exposes the OpenAI-compatible HTTP port through an Ingress with TLS."""
    docs = rendered[variant]
    gateway = service_settings(docs, "gateway")
    ingress = find_one(docs, "Ingress", "ffnskip-gateway-http")
    spec, notes = ingress["spec"], ingress["metadata"]["annotations"]
    assert spec["ingressClassName"] == "nginx"
    service_ports = {p["name"]: p["port"] for p in find_one(docs, "Service", "ffnskip-gateway")["spec"]["ports"]}
    tls_hosts = {host for entry in spec["tls"] for host in entry["hosts"] if entry.get("secretName")}
    for rule in spec["rules"]:
        assert rule["host"] in tls_hosts, f"{rule['host']}: served without TLS"
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "ffnskip-gateway" and service_ports[backend["port"]["name"]] == gateway.http_port
    assert notes["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    # through to the gateway: HTTPS when its port serves TLS (the gateway-tls component in gpu-all)
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == ("HTTPS" if gateway.tls_cert else "HTTP")
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off", "streamed tokens must not be held back"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600, "a stream lasts a generation"
    size = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) << 20 > gateway.max_message_bytes, "the gateway answers a 413, not nginx"
    assert gateway.http_keepalive_s > 60, "above ingress-nginx's 60 s upstream keep-alive: the proxy closes first"


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
