# One-command entry points. Both create (once) and reuse the virtual environment in .venv.
#   make demo   set up + run the main quantization job
#   make test   set up + run the test suite
#   make demo-dit  set up + run LRQ-DiT W4A8 on the committed reference DiT (offline)
#   make demo-video  set up + run LRQ-DiT W4A8 on the committed reference video Wan (offline)
#   make demo-vggt  set up + run QuantVGGT W8A8 on the committed reference VGGT (offline)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch comes first and pinned, so that nothing later can pull a multi-GB CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.archquant-installed
DEMO_CONFIG ?= configs/mamba_w8a8.yaml
PYTEST_ARGS ?=

.PHONY: venv demo demo-dit demo-video demo-vggt test clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check "setuptools>=68" wheel
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]" "$(TORCH_SPEC)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m archquant.run $(DEMO_CONFIG)

demo-dit: $(STAMP)
	$(PY) -m archquant.run configs/dit_w4a8.yaml

demo-video: $(STAMP)
	$(PY) -m archquant.run configs/wan_w4a8.yaml

demo-vggt: $(STAMP)
	$(PY) -m archquant.run configs/vggt_w8a8.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
