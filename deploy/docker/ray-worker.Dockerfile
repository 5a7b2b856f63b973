# docker build -t cirflow-ray:latest -f deploy/docker/ray-worker.Dockerfile .        (from the repository root)
# GPU workers: docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu --build-arg GPU=1 \
#   -t cirflow-ray:gpu -f deploy/docker/ray-worker.Dockerfile .
# The head and worker image of the embedding job's Ray cluster (deploy/ray/rayjob-embed.yaml): Ray's own image,
# whose layout KubeRay's probes expect (bash, wget, the `ray` user), with the same Ray version as the project
# pin, plus this repository installed with `pip install .`, so that `cirflow embed` is on the PATH.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
ARG GPU=0

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch from PyTorch's CPU index first: resolved from PyPI by `pip install .`, torch==2.13.0 is the multi-GB
# CUDA build, and the workers run the encoders through ONNX Runtime, not torch.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Made by the image's user (ray), so that pip can build the project in place.
RUN mkdir /home/ray/cirflow
WORKDIR /home/ray/cirflow
COPY --chown=ray:users pyproject.toml setup.py README.md requirements-gpu.txt ./
COPY --chown=ray:users core core
COPY --chown=ray:users models models
COPY --chown=ray:users export export
COPY --chown=ray:users indexing indexing
COPY --chown=ray:users flows flows
RUN pip install . \
    && if [ "$GPU" = "1" ]; then pip uninstall -y onnxruntime faiss-cpu && pip install -r requirements-gpu.txt; fi

WORKDIR /home/ray
