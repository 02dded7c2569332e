# The two commands a user needs: `make run` and `make test` (as root on Debian).
VENV := .venv
ARGS ?=

.PHONY: run test unit integration lint clean

run:
	@tools/bootstrap.sh run
	$(VENV)/bin/tapstack run $(ARGS)

test:
	@tools/bootstrap.sh test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest tests

unit:
	@tools/bootstrap.sh lint
	$(VENV)/bin/pytest tests/unit

integration:
	@tools/bootstrap.sh test
	$(VENV)/bin/pytest tests/integration

lint:
	@tools/bootstrap.sh lint
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
