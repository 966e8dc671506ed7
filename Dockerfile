# One image for the three services: `pagedserve executor | scheduler | router` (see compose.yaml),
# or all three supervised in one container with the default `pagedserve serve`.
#
# This is the CPU image. Two ways to build it:
#   docker build -t pagedserve .                       # a registry at hand: python:3.11-slim, PyPI
#   bash scripts/compose_check.sh                      # no registry, no network in the build:
#     docker build --build-arg BASE=pagedserve-base:bookworm --build-arg WHEELS=build/wheels .
# where scripts/base_image.sh makes the base from Debian's mirror (debootstrap, docker import) and
# build/wheels holds every wheel, fetched on the host with `pip download`. Built and run for real
# by scripts/compose_check.sh (docs/benchmarks.md has the result). For NVIDIA GPUs, start from an
# nvidia/cuda runtime image with Python 3.11 and install torch's CUDA build instead of the CPU one.
ARG BASE=python:3.11-slim

# ---- deps: a virtual environment at /opt/pagedserve with every dependency, no pagedserve --------
FROM ${BASE} AS deps
# A folder of wheels in the build context (pip install --no-index from it); empty: the index.
ARG WHEELS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/pagedserve/bin:$PATH
WORKDIR /src
# With WHEELS empty this copies one small file, so both paths share the steps below.
COPY ${WHEELS:-requirements.lock} /wheels/
COPY requirements.lock pyproject.toml ./
# torch's CPU build first: 2.13.0 is the version the test suite runs against (see the Makefile);
# PyTorch's CPU index keeps pip from pulling a CUDA build. Then what pyproject.toml depends on, at
# the tested versions (requirements.lock): a layer that source changes leave alone.
RUN python3 -m venv /opt/pagedserve \
    && if [ -n "$WHEELS" ]; then set -- --no-index --find-links /wheels; torch_index="$*"; \
       else set --; torch_index="--index-url https://download.pytorch.org/whl/cpu"; fi \
    && pip install "$@" -c requirements.lock pip setuptools \
    && pip install $torch_index torch==2.13.0 \
    && python3 -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' >deps.txt \
    && pip install "$@" -c requirements.lock -r deps.txt

# ---- build: pagedserve's own wheel (one top-level name, pagedserve), offline in both paths -------
FROM deps AS build
COPY README.md ./
COPY pagedserve ./pagedserve
COPY router ./router
COPY scheduler ./scheduler
COPY executor ./executor
COPY kernels ./kernels
COPY protos ./protos
COPY bench ./bench
RUN pip wheel --no-deps --no-build-isolation -w /dist .

# ---- the image ---------------------------------------------------------------------------------
FROM ${BASE}
# A C compiler builds kernels/cpu for the CPU it runs on, at first use (without one the executor
# runs the slower reference kernels). scripts/base_image.sh puts it in its base already; a base
# without one gets it from Debian's mirror.
RUN command -v gcc >/dev/null || { apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; }
COPY --from=deps /opt/pagedserve /opt/pagedserve
COPY --from=build /dist /dist
RUN /opt/pagedserve/bin/pip install --no-cache-dir --no-deps --no-index /dist/*.whl \
    && /opt/pagedserve/bin/pip check

RUN useradd --create-home --uid 1000 pagedserve \
    && mkdir -p /home/pagedserve/.cache/pagedserve && chown -R pagedserve /home/pagedserve/.cache
USER pagedserve
# Everything written at run time goes under the cache (compose mounts it writable; the root
# filesystem may be read-only): compiled CPU kernels, Triton's and Hugging Face's caches.
ENV PATH=/opt/pagedserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAGEDSERVE_CACHE=/home/pagedserve/.cache/pagedserve \
    TRITON_CACHE_DIR=/home/pagedserve/.cache/triton \
    HF_HOME=/home/pagedserve/.cache/huggingface
WORKDIR /home/pagedserve

# The model directory (HF format) or a folder holding a .gguf file is mounted here, read-only; it
# is never baked into the image.
VOLUME ["/model"]
EXPOSE 8000 50051

# For the default `serve`; compose.yaml gives each service its own.
HEALTHCHECK --interval=10s --timeout=4s --start-period=300s --retries=3 \
    CMD ["pagedserve", "healthcheck", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["pagedserve"]
CMD ["serve", "/model", "--host", "0.0.0.0"]
