# The SSOLE Hub embedding server (server/, `python -m server`).
#
#   docker build -t ssole-server .                                  # CPU torch (default)
#   docker build -t ssole-server:cuda --build-arg TORCH_VARIANT=cu128 .   # CUDA 12.8 wheels
#
#   docker run --rm -p 8000:8000 -e SSOLE_SERVER_MODEL=hf-hub:ORG/REPO ssole-server
#
# Every setting is an SSOLE_SERVER_* environment variable (see `python -m server --help`).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# torch comes from PyTorch's own index: `cpu` keeps the image small; cu126/cu128/... bundle the
# CUDA runtime in the wheels, so the slim base works on GPUs (run with `--gpus all`).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ssole
WORKDIR /app

# Dependencies first, in their own layers, so code changes do not reinstall torch.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
COPY pyproject.toml README.md ./
COPY ssole_hub ./ssole_hub
RUN pip install ".[serve,onnx]"
COPY server ./server

USER ssole
ENV HOME=/home/ssole \
    HF_HOME=/home/ssole/.cache/huggingface \
    SSOLE_SERVER_HOST=0.0.0.0 \
    SSOLE_SERVER_PORT=8000
# SSOLE_SERVER_MODEL picks the model at run time: a registered name (ssole_resnet50.in1k_m8),
# hf-hub:ORG/REPO, or local-dir:/models/NAME for a hub folder mounted into the container.
EXPOSE 8000

# /health is open even with an API key; it fails only if the model could not be loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${SSOLE_SERVER_PORT}/health', timeout=4)" || exit 1

CMD ["python", "-m", "server"]
