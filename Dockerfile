# polyinr training image: `docker run --gpus all IMAGE train` (any `polyinr` subcommand).
#
# Base: plain Debian 12 Python 3.11, the same OS the install script is tested on. It is
# CUDA-capable because the torch 2.14.1 wheel from PyPI brings its own CUDA 13 runtime,
# cuDNN, cuBLAS and NCCL as nvidia-* wheels (pinned in requirements.lock); only the driver
# (>= 580 for CUDA 13) comes from the host through the NVIDIA Container Toolkit. An
# nvidia/cuda base would add a second CUDA copy and an Ubuntu Python 3.10.
FROM python:3.11-slim-bookworm

# What the NVIDIA runtime mounts into the container: the driver's compute libraries.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app
# The dependency layer rebuilds only when the lock, the metadata or the installer change.
COPY pyproject.toml requirements.lock README.md ./
COPY scripts/install.sh scripts/
RUN mkdir polyinr && touch polyinr/__init__.py \
    && POLYINR_NO_VENV=1 bash scripts/install.sh \
    && rm -rf /var/lib/apt/lists/*
COPY . .
# A non-root user owns the working tree: DVC, the flow and training write beside the code.
RUN useradd --create-home --uid 1000 polyinr && chown -R polyinr:polyinr /app
USER polyinr

ENTRYPOINT ["polyinr"]
CMD ["--help"]
