# syntax=docker/dockerfile:1
# ffnskip gateway: the public gRPC API (port 50051) and Prometheus /metrics (port 9090).
# A slim CPU image: the gateway runs no model, but the package's dependencies (accelerate)
# require torch, so the small CPU build is installed first (never the multi-GB CUDA one).
#
# Build from the repository root (see docs/ops.md, "Build the images"):
#   docker build -f docker/gateway.Dockerfile -t REGISTRY/ffnskip-gateway:0.1.0 .
#
# Base images are pinned by exact tag. For byte-for-byte reproducible builds, resolve the
# digest once (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`) and append
# `@sha256:...` to both FROM lines.

FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
# Dependencies first (pinned in pyproject.toml), so source edits do not reinstall them.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(chr(10).join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY protos ./protos
COPY shared ./shared
COPY services ./services
# Generate the protobuf modules into shared/ffnskip/v1, then install the package (not editable).
RUN PYTHONPATH=shared python -m ffnskip.rpc.codegen \
 && pip install --no-deps . \
 && python -c "import services.gateway.main, ffnskip.v1.gateway_pb2"


FROM python:3.11.14-slim-bookworm

RUN groupadd --system --gid 10001 ffnskip \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ffnskip --create-home --shell /usr/sbin/nologin ffnskip

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/ffnskip \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/ffnskip
EXPOSE 50051 9090
ENTRYPOINT ["python", "-m", "services.gateway.main"]
