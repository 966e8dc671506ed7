# One image for the three services: `pagedserve executor | scheduler | router` (see compose.yaml),
# or all three supervised in one container with the default `pagedserve serve`.
#
# This is the CPU image. Not built in CI: no machine of ours runs a Docker engine, so treat it as
# written-down intent until someone builds it. For NVIDIA GPUs, start from an nvidia/cuda runtime
# image with Python 3.11 and install torch's CUDA build instead of the CPU one.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from PyTorch's CPU index, so that installing pagedserve does not pull a CUDA build.
# 2.13.0 is the version the test suite runs against (see the Makefile).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md requirements.lock ./
COPY pagedserve ./pagedserve
COPY router ./router
COPY scheduler ./scheduler
COPY executor ./executor
COPY kernels ./kernels
COPY protos ./protos
COPY bench ./bench
# The tested set (requirements.lock); the wheel installs one top-level name, pagedserve.
RUN pip install -c requirements.lock .

RUN useradd --create-home --uid 1000 pagedserve
USER pagedserve
ENV PAGEDSERVE_CACHE=/home/pagedserve/.cache/pagedserve

# The model directory (HF format) is mounted here; it is never baked into the image.
VOLUME ["/model"]
EXPOSE 8000 50051

ENTRYPOINT ["pagedserve"]
CMD ["serve", "/model", "--host", "0.0.0.0"]
