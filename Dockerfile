# The hpt image: controller, agents and the training ranks the agents launch.
#
#   docker build -t hpt:0.1.0 .                                   # CPU torch
#   docker build -t hpt:0.1.0-cu128 --build-arg TORCH_VARIANT=cu128 .   # CUDA torch
#
# The Helm chart's default image is hpt:<appVersion>. For training, build FROM this image and add
# your code and its dependencies (the agents run ranks inside the agent container).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

# torch wheel variant: cpu, or a CUDA build such as cu126 / cu128 (the wheel carries the CUDA
# runtime; the node needs only the NVIDIA driver and the device plugin)
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

# libisal2: ISA-L erasure coding (hpt falls back to a slower codec without it)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libisal2 \
 && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/hpt
COPY pyproject.toml README.md ./
COPY hpt ./hpt
COPY controller ./controller
COPY agent ./agent
COPY ckpt ./ckpt
COPY monitor ./monitor
RUN pip install --no-cache-dir . && rm -rf /opt/hpt

# the chart runs every container as this non-root user (restricted Pod Security Standard)
RUN groupadd --gid 10001 hpt && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin hpt
USER 10001:10001
WORKDIR /home/hpt
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["hptctl"]
CMD ["--help"]
