# cirflow: the two commands of README.md. Both create .venv when missing and install the pinned project.
# Plain pip on purpose: it finds the local CPU torch wheel (uv would download a CUDA build).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean images gpu-check gpu-wheels

# torch is the CPU build: from a local wheel folder when pip is configured with one that holds it (pip's
# find-links, as on our machines: nothing downloaded), else from PyTorch's CPU index, since PyPI's torch is the
# multi-GB CUDA build. The project install then finds torch==2.13.0 satisfied (2.13.0+cpu) and keeps it.
# GPU machines: docs/installing.md, "GPU machines".
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null || \
	  $(VENV)/bin/pip install -q --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirflow demo --workdir workdir

# The search page's test drives Debian's chromium + chromium-driver (never a browser downloaded by a test tool).
# Installed only where it can be: Debian or Ubuntu (apt-get), as root or with password-less sudo. Elsewhere, or
# with CIRFLOW_SKIP_BROWSER=1, nothing is installed and the page tests report themselves skipped with the reason.
browser:
	@if [ "$${CIRFLOW_SKIP_BROWSER:-0}" = 1 ]; then echo "browser: CIRFLOW_SKIP_BROWSER=1, not installed"; \
	elif [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif ! command -v apt-get >/dev/null; then echo "browser: no apt-get here; the page tests will be skipped"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && \
	  sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "browser: not root and no password-less sudo; the page tests will be skipped"; fi

# Two pytest workers (pytest-xdist), one test file each at a time, so module fixtures stay whole: the suite spends
# half its time waiting on servers, subprocesses and Ray, and a second worker fills it (13 -> 10 min on 2 cores).
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The flow runner, Ray worker and search service images, built with buildah (no Docker daemon, no registry) on a
# Debian base made from Debian's packages, each run once: deploy/docker/build.sh has the settings (BASE, WHEELS).
IMAGES ?= search flows ray-worker
images:
	deploy/docker/build.sh $(IMAGES)

clean:
	rm -rf $(VENV) workdir test-artifacts build

# The GPU check (bench/gpu_check.py) on a Python that has torch but not our environment: nothing is installed
# there. The stage folders go on PYTHONPATH as the cirflow.* namespace through symlinks in a throwaway folder,
# with the wheels of `make gpu-wheels` (when that folder was carried along) unpacked beside them.
GPU_PY ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
GPU_WHEELS := .gpu-wheels
OUT ?= workdir/gpu-check
GPU_CHECK_ARGS ?=

gpu-check:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; mkdir "$$tmp/cirflow"; \
	for stage in core models export indexing flows; do ln -s "$(CURDIR)/$$stage" "$$tmp/cirflow/$$stage"; done; \
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --no-deps --no-index --target "$$tmp/site" $(GPU_WHEELS)/*.whl; fi; \
	PYTHONPATH="$$tmp:$$tmp/site$${PYTHONPATH:+:$$PYTHONPATH}" \
	  $(GPU_PY) bench/gpu_check.py --out '$(OUT)' $(GPU_CHECK_ARGS)

# Pure-Python wheels the check may lack there (torch's ONNX exporter needs onnxscript + onnx_ir; export/tensorrt.py
# imports onnxconverter-common): about 1 MB, for Python 3.12, into $(GPU_WHEELS) (gitignored) to carry along.
gpu-wheels:
	$(GPU_PY) -m pip download -q --python-version 3.12 --only-binary=:all: --no-deps -d $(GPU_WHEELS) \
	  onnxscript==0.7.2 onnx_ir==1.1.0 onnxconverter-common==1.16.0
