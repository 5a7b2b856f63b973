# cirflow: the two commands of README.md. Both create .venv when missing and install the pinned project.
# Plain pip on purpose: it finds the local CPU torch wheel (uv would download a CUDA build).
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirflow demo --workdir workdir

# The search page's test drives Debian's chromium + chromium-driver (never a browser downloaded by a test tool).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) workdir test-artifacts

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
