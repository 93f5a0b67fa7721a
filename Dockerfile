# syntax=docker/dockerfile:1.7
# Smart-Diffusion's two images, built from this one context:
#
#   docker build --target operator -t ghcr.io/smart-diffusion/operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/smart-diffusion/runtime:0.1.0 .
#
# operator: slim Python with `smart-diffusion[operator]` (kopf, kubernetes, prometheus-client);
#           no torch. The Helm chart runs it as `python -m smartdiff_operator`.
# runtime:  a CUDA PyTorch base with `smart-diffusion[runtime]` and the model configs; the
#           operator's Jobs run `torchrun ... -m smartdiff.worker` in it.
# Both run as the unprivileged user 65532. Base images are pinned by tag; pin them by
# digest as well (`--build-arg PYTHON_IMAGE=python:...@sha256:...`) in a release pipeline.
# The PyTorch base carries the same torch as pyproject.toml's runtime extra (2.15.0, CUDA 13.2),
# so pip keeps it instead of downloading another.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG PYTORCH_IMAGE=pytorch/pytorch:2.15.0-cuda13.2-cudnn9-runtime
# The package version (pyproject.toml's; tests/test_helm_chart.py checks they agree).
ARG SMARTDIFF_VERSION=0.1.0

# ---------------------------------------------------------------------------------------
# wheel: the package, built once for both images (pure Python, py3-none-any).
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY runtime/smartdiff runtime/smartdiff
COPY operator/smartdiff_operator operator/smartdiff_operator
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# operator: no torch, no compiler, read-only root filesystem friendly.
FROM ${PYTHON_IMAGE} AS operator
ARG SMARTDIFF_VERSION
LABEL org.opencontainers.image.title="smart-diffusion-operator" \
      org.opencontainers.image.description="Kubernetes operator for VideoGeneration resources" \
      org.opencontainers.image.source="https://github.com/smart-diffusion/smart-diffusion" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 65532 smartdiff \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin smartdiff
COPY --from=wheel /wheels /wheels
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The extra's pins come from pyproject.toml (exact versions).
RUN pip install "/wheels/smart_diffusion-${SMARTDIFF_VERSION}-py3-none-any.whl[operator]" \
    && rm -rf /wheels \
    && python -c "import smartdiff_operator.__main__, importlib.util as u; assert u.find_spec('torch') is None"
USER 65532:65532
WORKDIR /tmp
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "smartdiff_operator"]

# ---------------------------------------------------------------------------------------
# runtime: CUDA PyTorch + the engine, the model configs and ffmpeg (H.264).
FROM ${PYTORCH_IMAGE} AS runtime
ARG SMARTDIFF_VERSION
LABEL org.opencontainers.image.title="smart-diffusion-runtime" \
      org.opencontainers.image.description="Smart-Diffusion text-to-video engine (Wan2.1), CUDA" \
      org.opencontainers.image.source="https://github.com/smart-diffusion/smart-diffusion" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/smartdiff \
    SMARTDIFF_MODEL_CONFIGS=/opt/smartdiff/configs/models
RUN groupadd --system --gid 65532 smartdiff \
    && useradd --system --uid 65532 --gid 65532 --create-home --home-dir /home/smartdiff \
       --shell /usr/sbin/nologin smartdiff
COPY --from=wheel /wheels /wheels
COPY configs/models /opt/smartdiff/configs/models
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# ffmpeg: the static build that the pinned imageio-ffmpeg wheel ships (with libx264), put on
# PATH; the engine's MP4 writer uses the same binary.
RUN pip install "/wheels/smart_diffusion-${SMARTDIFF_VERSION}-py3-none-any.whl[runtime]" \
    && rm -rf /wheels \
    && ln -s "$(python -c 'import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())')" \
       /usr/local/bin/ffmpeg \
    && ffmpeg -hide_banner -encoders | grep libx264 >/dev/null \
    && python -c "import torch, smartdiff.worker; print('torch', torch.__version__)"
USER 65532:65532
WORKDIR /home/smartdiff
CMD ["smartdiff", "--help"]
