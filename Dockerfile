# syntax=docker/dockerfile:1
# The cxr image that every manifest under infra/k8s names (see docs/DEPLOY.md):
#
#   docker build -t ghcr.io/cxr/cxr:0.1.0 .                           # CPU: MLflow server, Ray heads
#   docker build -f Dockerfile.cuda -t ghcr.io/cxr/cxr:0.1.0-cuda .   # CUDA: Ray GPU workers
#   docker build --target kubectl -t ghcr.io/cxr/cxr:0.1.0-kubectl .  # the CronJobs' scheduler
#
# The tag is the project version (pyproject.toml); tests/test_infra.py checks that the manifests
# name exactly these tags. Base images are pinned by tag.
ARG CXR_VERSION=0.1.0

# kubectl comes from the Kubernetes project's own image. That image's contents have changed across
# releases (distroless in some, a shell in others), so the scheduler copies only the static binary
# onto a base that surely has /bin/sh, grep, awk, head and xargs.
FROM registry.k8s.io/kubectl:v1.31.4 AS kubectl-bin

FROM debian:12.9-slim AS kubectl
ARG CXR_VERSION
LABEL org.opencontainers.image.title="cxr-kubectl" org.opencontainers.image.version="${CXR_VERSION}"
COPY --from=kubectl-bin /bin/kubectl /usr/local/bin/kubectl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubectl"]

FROM python:3.11.11-slim-bookworm AS cxr
ARG CXR_VERSION
LABEL org.opencontainers.image.title="cxr" org.opencontainers.image.version="${CXR_VERSION}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0
# torch/torchvision first and alone, as CPU wheels: resolved with the rest, pip would pull the
# multi-GB CUDA build from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
WORKDIR /app
# Dependencies before the source, so a code change does not reinstall the stack.
COPY pyproject.toml README.md ./
COPY cxr/__init__.py cxr/__init__.py
COPY jobs/__init__.py jobs/__init__.py
COPY infra/__init__.py infra/__init__.py
RUN pip install . psycopg2-binary==2.9.10 && pip uninstall -y cxr
COPY . .
# Editable: cxr.config.REPO_ROOT is the directory above the package, and the jobs read
# mlflow.yaml, models/cxr-screen and infra/k8s/configs/*.yaml relative to it (workingDir /app in
# the RayJobs), so the package must stay at /app. --no-deps: the pinned stack is already in.
RUN pip install --no-deps -e . && cxr --help >/dev/null
RUN useradd --create-home --uid 1000 cxr && chown -R cxr /app
USER 1000
CMD ["cxr", "--help"]
