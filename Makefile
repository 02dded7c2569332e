# The two commands a user needs: `make run` and `make test` (as root on Debian).
VENV := .venv
ARGS ?=

.PHONY: run test unit integration lint clean fuzz soak bench

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

# Long fuzzing of Interface.receive (hypothesis); a crash becomes a regression test.
fuzz:
	@tools/bootstrap.sh lint
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-100000} $(VENV)/bin/pytest -x \
		tests/unit/test_fuzz_transport.py tests/unit/test_receive_fuzz.py

# tapstack (plain, --offload) against the kernel with the same app and clients; a few
# minutes. `make bench ARGS=--quick` is the one-minute smoke run.
bench:
	@tools/bootstrap.sh test
	$(VENV)/bin/python tools/bench.py $(ARGS)

# Ten minutes of wrk with kernel-made loss; RSS over time in bench/results/soak.png.
soak:
	@tools/bootstrap.sh test
	$(VENV)/bin/python tools/soak.py --duration $${DURATION:-600}

lint:
	@tools/bootstrap.sh lint
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
