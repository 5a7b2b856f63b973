# docker build -t cirflow-search:latest -f deploy/docker/search.Dockerfile .        (from the repository root)
# The search service (cirflow serve): FastAPI + uvicorn over a published index and its bundle. The image holds
# only what serving imports (ONNX Runtime, FAISS, tokenizers, PIL, pyarrow, FastAPI, the docs' Swagger UI files):
# no torch, Ray or Prefect.
# The index and bundles come from storage mounted at /data (deploy/k8s/search-service.yaml).
#   docker run -p 8000:8000 -v $PWD/workdir:/data/workdir:ro cirflow-search:latest \
#       serve --index /data/workdir/indexes/shapes-shop --host 0.0.0.0
# Without a registry: `make images` (deploy/docker/build.sh) builds it with buildah on a local Debian base (BASE).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/cirflow

# The serving subset of the pinned dependencies, read from pyproject.toml so that the pins live in one place
# (tests/indexing/test_service_deploy.py checks that this subset is enough to import and run the service).
# pip's cache lives in the builder (a cache mount), not in the image: a rebuild downloads nothing again.
COPY pyproject.toml setup.py README.md ./
RUN --mount=type=cache,target=/root/.cache/pip python -c "import tomllib, re; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
keep = {'numpy', 'pillow', 'tokenizers', 'pyyaml', 'onnxruntime', 'pyarrow', 'faiss-cpu', 'fastapi', 'uvicorn', \
'python-multipart', 'prometheus-client', 'fastapi-offline'}; \
print('\n'.join(d for d in deps if re.split('[=<>\\[ ]', d)[0] in keep))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY core core
COPY models models
COPY export export
COPY indexing indexing
COPY flows flows
RUN pip install --no-cache-dir --no-deps . && useradd --create-home --uid 1000 cirflow

USER cirflow
EXPOSE 8000
ENTRYPOINT ["cirflow"]
CMD ["serve", "--index", "/data/workdir/indexes/shapes-shop", "--bundle", "/data/workdir/bundles", "--host", "0.0.0.0", "--port", "8000"]
