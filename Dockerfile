# The MNIST ConvNet training job (PyTorch + Weights & Biases) as a GPU container.
#
#   scripts/build-image          # the documented build: fills wheelhouse/ from requirements/, then builds
#
# pip installs only from wheelhouse/ (no index, no network), only the hash-locked requirements/*.txt
# (scripts/lock makes them). The entrypoint (python -m app.container.entrypoint) runs one training run or a
# `wandb agent`, chosen by env vars. WANDB_API_KEY is only ever given at run time (-e, --env-file,
# compose's .env): no secret in any layer.
# Layers of the final image, cheapest to redo last: python, torch (~5.8 GB, redone only when
# requirements/torch.txt changes), the other dependencies (~0.23 GB, requirements/app.txt), the code.

# The base has to provide only glibc and python3 (installed below when missing). PyTorch's pip wheels carry
# their own CUDA runtime, cuDNN, cuBLAS and NCCL (the nvidia-* wheels) and the NVIDIA container runtime
# mounts the driver in, so a CUDA `-base` image is enough: `-runtime`/`-cudnn` would add GBs of libraries
# torch never loads. The base's CUDA version only sets the runtime's driver check (NVIDIA_REQUIRE_CUDA):
# keep it equal to the wheel's. torch 2.14.1 from PyPI is built for CUDA 13.0 (driver >= 580).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${BASE_IMAGE} AS python
# CUDA bases have no python; images that do (the tests' debootstrap base) skip apt entirely.
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The image's venv has no pip: a second venv's pip installs into it (PIP_PYTHON), so pip stays out of the
# image. --no-deps: each lock lists every package it installs, with its hashes. The wheels are bind-mounted,
# never copied into a layer; a mount's content is part of its step's cache key, hence one folder per lock.
FROM python AS torch
ENV PIP_PYTHON=/opt/venv/bin/python PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv --without-pip /opt/venv && python3 -m venv /opt/pip
RUN --mount=type=bind,source=wheelhouse/torch,target=/wheels \
    --mount=type=bind,source=requirements/torch.txt,target=/tmp/torch.txt \
    /opt/pip/bin/pip install --require-hashes --no-deps --find-links /wheels --requirement /tmp/torch.txt

# The other dependencies, dumb-init among them. Only the files this install adds go on (/opt/deps mirrors
# /opt/venv): the torch layer stays as it is, whatever this one does. Left out (~26 MB nothing in the image
# imports): test suites and ONNX's conformance models, onnxruntime's offline model-tuning tools.
FROM torch AS deps
RUN --mount=type=bind,source=wheelhouse/app,target=/wheels \
    --mount=type=bind,source=requirements/app.txt,target=/tmp/app.txt \
    touch /tmp/before \
    && /opt/pip/bin/pip install --require-hashes --no-deps --find-links /wheels --requirement /tmp/app.txt \
    && (cd /opt/venv/lib/python3.*/site-packages \
        && rm -rf onnx/backend/test onnxruntime/transformers onnxruntime/quantization onnxruntime/tools \
            sqlalchemy/testing alembic/testing optuna/testing) \
    && /opt/pip/bin/pip check \
    && PYTHONDONTWRITEBYTECODE=1 /opt/venv/bin/python -c 'import torch, torchvision, wandb, onnx, \
onnxruntime, optuna, alembic, psycopg2, sqlalchemy.dialects.postgresql' \
    && /opt/venv/bin/dumb-init --version \
    && mkdir /opt/deps \
    && find /opt/venv -newer /tmp/before ! -type d -printf '%P\n' \
        | tar -C /opt/venv -c --verbatim-files-from -T - | tar -C /opt/deps -x

FROM python AS runtime
LABEL org.opencontainers.image.title="mnist-sweeps" \
      org.opencontainers.image.description="PyTorch ConvNet on MNIST with Weights & Biases runs and sweep agents"

# A fixed non-root UID/GID 1000 (Ubuntu bases already use 1000 for `ubuntu`: replaced). HOME is writable by
# any UID because compose runs the container as the host user (`user: UID:GID`), who still needs a HOME
# for the W&B and torch caches. The volume folders belong to 1000 so fresh named volumes do.
RUN set -eu; \
    user=$(getent passwd 1000 | cut -d: -f1) || true; \
    if [ -n "$user" ]; then userdel --remove "$user" 2>/dev/null || userdel "$user"; fi; \
    group=$(getent group 1000 | cut -d: -f1) || true; \
    if [ -n "$group" ]; then groupdel "$group"; fi; \
    groupadd --gid 1000 trainer; \
    useradd --uid 1000 --gid 1000 --create-home --home-dir /home/trainer --shell /bin/bash trainer; \
    chmod 1777 /home/trainer; \
    mkdir -p /data /runs /outputs; \
    chown trainer:trainer /data /runs /outputs

# The venv in two layers: torch's (same digest whatever the other dependencies are), then what the other
# dependencies added to it. `docker history` shows both.
COPY --from=torch /opt/venv /opt/venv
COPY --from=deps /opt/deps/ /opt/venv/
# PYTHONPATH: `import app` from any working directory (the code is not pip-installed).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    HOME=/home/trainer \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DATA_DIR=/data \
    WANDB_DIR=/runs \
    OUTPUT_DIR=/outputs

WORKDIR /app
COPY sweeps ./sweeps
COPY app ./app
# Compiled here because the non-root user cannot write __pycache__ under /app.
RUN python -m compileall -q app

VOLUME ["/data", "/runs", "/outputs"]
USER 1000:1000
ENTRYPOINT ["dumb-init", "--", "python", "-m", "app.container.entrypoint"]
CMD []
