# docker build -t cirflow-ray:latest -f deploy/docker/ray-worker.Dockerfile .        (from the repository root)
# GPU workers: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu --build-arg GPU=1 \
#   -t cirflow-ray:gpu -f deploy/docker/ray-worker.Dockerfile .
# The head and worker image of the embedding job's Ray cluster (deploy/ray/rayjob-embed.yaml): Ray's own image,
# whose layout KubeRay's probes expect (bash, wget, the `ray` user), with the same Ray version as the project
# pin, plus this repository installed with `pip install .`, so that `cirflow embed` is on the PATH.
# Without a registry: `make images` (deploy/docker/build.sh) builds it with buildah on a local Debian base (BASE),
# to which the step below adds what Ray's image has and KubeRay needs.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
ARG GPU=0
# A folder of wheels mounted into the build that holds the CPU torch wheel (build.sh mounts pip's local wheel
# folder at /wheels); empty: PyTorch's CPU index.
ARG WHEELS=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay runs the pods as Ray's image user `ray` (uid 1000, group users), installing into a Python that user
# owns, with wget for its probes. Ray's images have all three; on a plain Python base they are made here (the
# Python as a venv of `ray`'s, first on the PATH; the directory does not exist in Ray's image).
USER root
RUN if ! id -u ray >/dev/null 2>&1; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends wget >/dev/null \
      && rm -rf /var/lib/apt/lists/* \
      && useradd --create-home --uid 1000 --gid users --shell /bin/bash ray \
      && python -m venv /home/ray/venv && chown -R ray:users /home/ray/venv; fi
ENV PATH=/home/ray/venv/bin:$PATH
USER ray

# torch first, the CPU build: resolved from PyPI by `pip install .`, torch==2.13.0 is the multi-GB CUDA build,
# and the workers run the encoders through ONNX Runtime, not torch. pip's cache lives in the builder (a cache
# mount), not in the image: a rebuild downloads nothing again.
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 if [ -n "$WHEELS" ]; then pip install --no-index --no-deps --find-links "$WHEELS" torch==2.13.0; \
    else pip install --index-url "$TORCH_INDEX" torch==2.13.0; fi

# Made by the image's user (ray), so that pip can build the project in place.
RUN mkdir /home/ray/cirflow
WORKDIR /home/ray/cirflow

# The pinned dependencies in a layer of their own, so that a code change reinstalls only the project.
COPY --chown=ray:users pyproject.toml setup.py README.md requirements-gpu.txt ./
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime faiss-cpu && pip install -r requirements-gpu.txt; fi

COPY --chown=ray:users core core
COPY --chown=ray:users models models
COPY --chown=ray:users export export
COPY --chown=ray:users indexing indexing
COPY --chown=ray:users flows flows
RUN pip install --no-cache-dir --no-deps .

WORKDIR /home/ray
