"""The gateway: the public gRPC API (protos/ffnskip/v1/gateway.proto). It routes each
request to the least-loaded live decoder pod of its model (found in the Redis registry),
fails over before the first token, checks API keys, and keeps fleet-wide telemetry
(Prometheus /metrics per replica, GetTelemetry summed over replicas through Redis).

Run: `python -m services.gateway.main`; settings: services/gateway/settings.py (ENV_VARS).
"""
