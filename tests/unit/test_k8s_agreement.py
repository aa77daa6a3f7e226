"""The Kubernetes manifests agree with the code they deploy: container ports, probe ports and
Service ports equal each service's default ports (services/<name>/settings.py); the environment
each container gets is exactly what its settings read (ENV_VARS), and parses with the service's
own settings class; the probes ask for the health names the server registers
(ffnskip/rpc/server.py); the grace period covers the drain; the recalibration jobs parse with
the real `ffnskip` CLI and target the calibrator. Rendering: tests/helpers/k8s.py.
"""

from __future__ import annotations

import re

import pytest

from ffnskip.rpc.server import LIVENESS, READINESS
from tests.helpers.k8s import (  # noqa: F401 (rendered is a fixture)
    FAKE_FIELDS,
    FROM_SECRETS,
    REQUIRED,
    SERVICE_PROBE_NAMES,
    SERVICES,
    UNSET_ON_PURPOSE,
    VARIANTS,
    container_env,
    env_vars_of,
    find_one,
    grpc_port_of,
    rendered,
    service_container,
    service_env,
    service_settings,
    settings_default,
)

# ------------------------------------------------------------------- agreement with the code

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_ports_match_the_settings(rendered, variant, service):
    docs = rendered[variant]
    container = service_container(docs, service)
    port = grpc_port_of(container)
    assert port == settings_default(service, "port"), f"{service}: container port {port} != the settings' default"
    assert service_settings(docs, service).port == port, f"{service}: the configured port differs from the container port"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if hasattr(service_settings(docs, service), "metrics_port"):  # (the decoder's default is 0 = off locally)
        assert ports.get("metrics") == service_settings(docs, service).metrics_port
    if hasattr(service_settings(docs, service), "http_port"):  # the gateway's HTTP API: off by default, on here
        assert service_settings(docs, service).http_port and ports.get("http") == service_settings(docs, service).http_port
    if service != "decoder":  # decoders are reached by pod IP from the registry, not a Service
        svc = find_one(docs, "Service", f"ffnskip-{service}")
        for entry in svc["spec"]["ports"]:
            assert entry["targetPort"] in ports and entry["port"] == ports[entry["targetPort"]], entry


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_environment_is_exactly_what_the_service_reads(rendered, variant, service):
    docs = rendered[variant]
    container = service_container(docs, service)
    env, source = service_env(docs, service)
    known = env_vars_of(service)
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
    settings = service_settings(rendered[variant], service)  # raises on any value the service refuses
    assert settings.host == "0.0.0.0", f"{service} must listen on all interfaces in a pod"
    if service == "decoder":
        assert settings.advertise_address == f"{FAKE_FIELDS['status.podIP']}:{settings.port}"
        env = service_container(rendered[variant], "decoder")["env"]
        names = [item["name"] for item in env]
        assert names.index("POD_IP") < names.index("FFNSKIP_ADVERTISE_ADDRESS"), "$(POD_IP) must be defined first"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_probes_ask_the_health_service(rendered, variant, service):
    docs = rendered[variant]
    container = service_container(docs, service)
    port = grpc_port_of(container)
    tls = bool(getattr(service_settings(docs, service), "tls_cert", None))
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
    pod = find_one(docs, "Deployment", f"ffnskip-{service}")["spec"]["template"]["spec"]
    pre_stop = service_container(docs, service).get("lifecycle", {}).get("preStop", {})
    sleep = int(pre_stop["exec"]["command"][-1]) if pre_stop.get("exec", {}).get("command", [""])[0] == "sleep" else 0
    drain = service_settings(docs, service).drain_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 30, f"{service}: drain {drain} s, preStop {sleep} s"


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoders_and_gateway_agree(rendered, variant):
    docs = rendered[variant]
    decoder, gateway = service_settings(docs, "decoder"), service_settings(docs, "gateway")
    assert gateway.max_new_tokens <= decoder.max_new_tokens_cap, "the gateway would pass requests decoders refuse"
    calibrator = service_settings(docs, "calibrator")
    assert decoder.model_name in calibrator.models, "profiles are stored under the calibrated model id"
    assert decoder.model == decoder.model_name


@pytest.mark.parametrize("variant", VARIANTS)
def test_gateway_tls_covers_both_public_ports(rendered, variant):
    """With TLS settings the gateway serves gRPC and HTTP over TLS from one mounted Secret, and
    everything in front of those ports (Service appProtocol, the ingresses) speaks TLS to them."""
    docs = rendered[variant]
    settings = service_settings(docs, "gateway")
    http_entry = next(p for p in find_one(docs, "Service", "ffnskip-gateway")["spec"]["ports"] if p["name"] == "http")
    assert http_entry["appProtocol"] == ("https" if settings.tls_cert else "http")
    backends = {d["metadata"]["name"]: d["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"]
                for d in docs if d["kind"] == "Ingress"}
    expected = {"ffnskip-gateway": "GRPCS", "ffnskip-gateway-http": "HTTPS"} if settings.tls_cert else \
        {"ffnskip-gateway": "GRPC", "ffnskip-gateway-http": "HTTP"}
    for name, protocol in backends.items():
        assert protocol == expected[name], f"Ingress {name}: backend-protocol {protocol}"
    if not settings.tls_cert:
        return
    pod = find_one(docs, "Deployment", "ffnskip-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in service_container(docs, "gateway")["volumeMounts"]}
    for path in (settings.tls_cert, settings.tls_key):
        directory, _, key = path.rpartition("/")
        mount = mounts[directory]
        assert mount.get("readOnly") is True, path
        assert volumes[mount["name"]]["secret"]["secretName"] == "ffnskip-gateway-tls", path
        assert key in ("tls.crt", "tls.key"), f"{path}: not a key of a kubernetes.io/tls Secret"


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
    env, _ = container_env(docs, container)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in [*container["command"][1:], *container["args"]]]
    assert container["command"][0] == "ffnskip"
    monkeypatch.delenv("FFNSKIP_CALIBRATOR_ADDRESS", raising=False)
    if "FFNSKIP_CALIBRATOR_ADDRESS" in env:
        monkeypatch.setenv("FFNSKIP_CALIBRATOR_ADDRESS", env["FFNSKIP_CALIBRATOR_ADDRESS"])
    args = cli.build_parser().parse_args(argv)
    assert args.command == "ops" and args.handler.__name__ == "_submit", argv
    assert args.wait and args.activate and args.idempotency_key == FAKE_FIELDS[
        "metadata.labels['batch.kubernetes.io/job-name']"]
    calibrator_port = settings_default("calibrator", "port")
    assert args.address == f"ffnskip-calibrator:{calibrator_port}"
    if variant != "recalibrate-job":
        find_one(docs, "Service", "ffnskip-calibrator")
        assert args.model in service_settings(docs, "calibrator").models
