# The MNIST ConvNet training job (PyTorch + Weights & Biases) as a GPU container.
#
#   scripts/build-image                                   # the documented build; works air-gapped (--help)
#   DOCKER_BUILDKIT=1 docker build -t mnist-sweeps:latest .   # straight from PyPI, needs internet
#
# The entrypoint (python -m app.entrypoint) runs one training run or a `wandb agent`, chosen by env vars.
# WANDB_API_KEY is only ever given at run time (-e, --env-file, compose's .env): no secret in any layer.
#
# Layers of the final image, cheapest to redo last: python, torch (~5.5 GB: the venv with torch and its
# dependencies), the other dependencies (~0.23 GB, rebuilt only when pyproject.toml's dependency list
# changes), the package metadata, the code. A dependency edit re-ships only the second venv layer, and
# editing app/ only the last small layers. There is no pip in the image: nothing at run time installs.

# The base has to provide only glibc and python3 (installed below when missing). PyTorch's pip wheels carry
# their own CUDA runtime, cuDNN, cuBLAS and NCCL (the nvidia-* wheels) and the NVIDIA container runtime
# mounts the driver in, so a CUDA `-base` image is enough: `-runtime`/`-cudnn` would add GBs of libraries
# torch never loads. The base's CUDA version only sets the runtime's driver check (NVIDIA_REQUIRE_CUDA):
# keep it equal to the wheel's. torch 2.14.1 from PyPI is built for CUDA 13.0 (driver >= 580); for older
# drivers build with TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 and
# BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 (driver >= 560).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04


FROM ${BASE_IMAGE} AS python
# CUDA bases have no python; Debian/Ubuntu images that do (the tests' debootstrap base) skip apt entirely,
# so an air-gapped build on such a base needs nothing but the wheelhouse.
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi


FROM python AS venv
# pip reads these from the environment. Point them at a wheelhouse (scripts/build-image does:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=http://127.0.0.1:PORT/) or a private index. They stay in the build stages:
# the final image's history and ENV never see them. Never put credentials in an index URL (build args are
# kept in the local build cache).
ARG PIP_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_NO_INDEX=
ARG PIP_TRUSTED_HOST=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
# The image's venv has no pip: a second venv's pip installs into it (`pip --python`), so pip stays out of
# the image without an uninstall that would leave files behind. The two helpers split the venv into
# layers: venv-files lists every file with its size and mtime (and every folder); `venv-delta BEFORE AFTER
# DEST` copies what is new since the listing BEFORE into DEST, and fails when a file of BEFORE changed or
# went away: that file lives in an earlier layer, so the image would silently keep the old one.
RUN python3 -m venv --without-pip /opt/venv \
    && python3 -m venv /opt/pip \
    && printf '%s\n' '#!/bin/sh' 'exec /opt/pip/bin/pip --python /opt/venv/bin/python "$@"' >/usr/local/bin/pip \
    && printf '%s\n' '#!/bin/sh' \
        'find /opt/venv -type d -printf "%p/\n" -o -printf "%p\t%s\t%T@\n" | LC_ALL=C sort' \
        >/usr/local/bin/venv-files \
    && printf '%s\n' '#!/bin/bash' 'set -euo pipefail' 'venv-files >"$2"' \
        'changed=$(LC_ALL=C comm -23 "$1" "$2" | cut -f1)' \
        'if [[ -n $changed ]]; then' \
        '    echo "error: this install changed or removed files of an earlier layer (pin what it upgraded):" >&2' \
        '    head -n 20 <<<"$changed" >&2' \
        '    exit 1' \
        'fi' \
        'mkdir -p "$3"' \
        'LC_ALL=C comm -13 "$1" "$2" | cut -f1 | sed "s|^/||; s|/\$||" \' \
        '    | tar -C / -c --no-recursion --verbatim-files-from --no-unquote -T - | tar -C "$3" -x' \
        'echo "venv-delta: $(find "$3" -type f | wc -l) new files, $(du -sh "$3" | cut -f1) in $3"' \
        >/usr/local/bin/venv-delta \
    && chmod +x /usr/local/bin/pip /usr/local/bin/venv-files /usr/local/bin/venv-delta

# torch + torchvision and their dependencies: the final image's first venv layer, which neither dependency
# nor code edits should redo. Empty TORCH_INDEX_URL = PyPI's default (CUDA) build; see BASE_IMAGE above for
# older drivers. The freeze pins every package of this layer for the next install.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC} \
    && mkdir /opt/layers \
    && pip freeze --all >/opt/layers/torch.txt \
    && venv-files >/opt/layers/torch.files


# The dependency list alone, out of pyproject.toml: the next stage copies it by content, so editing
# anything else in pyproject.toml (version, tool settings) does not reinstall the dependencies.
FROM venv AS requirements
COPY pyproject.toml /tmp/
# /opt/pip's python: the image's venv has no pip, whose tomli stands in for tomllib before Python 3.11.
RUN /opt/pip/bin/python -c 'import sys; \
toml = __import__("tomllib" if sys.version_info >= (3, 11) else "pip._vendor.tomli", fromlist=["load"]); \
project = toml.load(open("/tmp/pyproject.toml", "rb")); \
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))' > /tmp/requirements.txt


# The other dependencies, the build backend (the package stage installs the project without an index), and
# dumb-init: PID 1 that forwards signals and reaps zombies. The torch layer's freeze as constraints: a
# dependency that wants another numpy (say) fails here instead of rewriting the torch layer. Only the new
# files go on, in /opt/deps: the final image's second venv layer. Left out of it (~26 MB that nothing in
# the image imports): test suites and ONNX's conformance models, and onnxruntime's offline model-tuning
# tools (transformers/, quantization/, tools/), which InferenceSession never loads.
FROM venv AS build
COPY --from=requirements /tmp/requirements.txt /opt/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --constraint /opt/layers/torch.txt --requirement /opt/requirements.txt dumb-init \
    && (cd /opt/venv/lib/python3.*/site-packages \
        && rm -rf onnx/backend/test onnxruntime/transformers onnxruntime/quantization onnxruntime/tools \
            sqlalchemy/testing alembic/testing optuna/testing) \
    && PYTHONDONTWRITEBYTECODE=1 python -c 'import torch, torchvision, wandb, onnx, onnxruntime, optuna, \
alembic, psycopg2, sqlalchemy.dialects.postgresql' \
    && dumb-init --version \
    && venv-delta /opt/layers/torch.files /opt/layers/deps.files /opt/deps


# The package itself, editable: `import app` and the `mnist-sweeps` command load the code in /app/app. Only
# this small layer changes when pyproject.toml does; no index is needed (no deps, backend already installed).
FROM build AS package
COPY pyproject.toml /app/
RUN cd /app \
    && mkdir app && touch app/__init__.py \
    && pip install --no-index --no-deps --no-build-isolation --no-cache-dir --editable . \
    && venv-delta /opt/layers/deps.files /opt/layers/package.files /opt/package


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

# The venv in two layers: torch's (same digest whatever the other dependencies are) and the files the
# other dependencies added to it. `docker history` shows both.
COPY --from=venv /opt/venv /opt/venv
COPY --from=build /opt/deps/ /
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/trainer \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DATA_DIR=/data \
    WANDB_DIR=/runs \
    OUTPUT_DIR=/outputs

WORKDIR /app
COPY --from=package /opt/package/ /
COPY sweeps ./sweeps
COPY app ./app
# Compiled here because the non-root user cannot write __pycache__ under /app.
RUN python -m compileall -q app

VOLUME ["/data", "/runs", "/outputs"]
USER 1000:1000
ENTRYPOINT ["dumb-init", "--", "python", "-m", "app.container.entrypoint"]
CMD []
