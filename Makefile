# Both targets do their own set-up on a fresh machine: a .venv, the CPU build of torch
# (a local wheel; an unpinned torch would pull a multi-GB CUDA build), then lmstack.
PY := .venv/bin/python
TORCH := torch==2.13.0

.PHONY: speedrun test setup clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: .venv/.installed

speedrun: setup
	.venv/bin/lmstack speedrun

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
