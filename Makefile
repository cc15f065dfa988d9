# `make run`: the built-in demo (real SmolLM2 model, real text, every method, table + plot).
# `make test`: the test suite. Both set everything up on a fresh machine first.
VENV ?= .venv
export VENV

.PHONY: setup run test
setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/countdown run

test: setup
	COUNTDOWN_REQUIRE_REAL_MODELS=1 $(VENV)/bin/python -m pytest -q
