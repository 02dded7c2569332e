# The two commands a user needs: `make run` and `make test` (as root on Debian).
VENV := .venv
ARGS ?=

.PHONY: run test unit integration lint clean fuzz soak bench vm-check vm-up vm-test vm-destroy \
	vm-image vm-image-test

run:
	@tools/bootstrap.sh run
	$(VENV)/bin/tapstack run $(ARGS)

test:
	@tools/bootstrap.sh test
	$(VENV)/bin/ruff check .
	@$(MAKE) --no-print-directory vm-check
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

# tapstack (plain, --offload) against the kernel with the same app and clients, then a
# tapstack router against a Linux router, then DNS (dnsperf), then HTTPS and uvicorn on
# tapstack against uvicorn on the kernel, then what the decision trace costs (a few
# minutes), then the loss x RTT matrix of TCP senders, tapstack's congestion controllers
# against the kernel's (about 1.5 hours; most of it transfers capped at 60 s).
# `make bench ARGS=--quick` is the smoke run.
bench:
	@tools/bootstrap.sh test
	$(VENV)/bin/python tools/segcost.py --json bench/results/segcost$(if $(ARGS),-quick).json $(ARGS)
	$(VENV)/bin/python tools/segcost.py --offload csum --json bench/results/segcost-csum$(if $(ARGS),-quick).json $(ARGS)
	$(VENV)/bin/python tools/bench.py $(ARGS)
	$(VENV)/bin/python tools/bench_forward.py $(ARGS)
	$(VENV)/bin/python tools/bench_dns.py $(ARGS)
	$(VENV)/bin/python tools/bench_tls.py $(ARGS)
	$(VENV)/bin/python tools/bench_trace.py $(ARGS)
	$(VENV)/bin/python tools/bench_matrix.py $(ARGS)

# Ten minutes of wrk with kernel-made loss; RSS over time in bench/results/soak.png.
soak:
	@tools/bootstrap.sh test
	$(VENV)/bin/python tools/soak.py --duration $${DURATION:-600}

# The VM path, checked without a VM: shellcheck on every shell script (the provisioning
# first), and `vagrant validate` on the Vagrantfile, so a broken one fails `make test`.
# VAGRANT_NETNS runs Vagrant inside a namespace (see vagrant/libvirt-netns.sh).
VAGRANT := cd vagrant && VAGRANT_CHECKPOINT_DISABLE=1 \
	$(if $(VAGRANT_NETNS),ip netns exec $(VAGRANT_NETNS)) vagrant
SHELL_SCRIPTS := vagrant/provision.sh $(filter-out vagrant/provision.sh,$(wildcard vagrant/*.sh)) \
	$(wildcard tools/*.sh) .ci/run
vm-check:
	shellcheck $(SHELL_SCRIPTS)
	$(VAGRANT) validate --ignore-provider

# A Vagrant VM (Debian 12, libvirt or VirtualBox; VM_PROVIDER=libvirt to choose one).
vm-up:
	$(VAGRANT) up $(if $(VM_PROVIDER),--provider=$(VM_PROVIDER))

vm-test: vm-up
	$(VAGRANT) rsync
	$(VAGRANT) ssh -c 'cd /vagrant && sudo make test'

vm-destroy:
	$(VAGRANT) destroy -f

# Without Vagrant Cloud: a Debian 12 image from Debian's mirror (debootstrap), booted under
# qemu (KVM where the CPU has vmx/svm, else emulation), `make test` inside, pass or fail.
vm-image:
	vagrant/build-image.sh

vm-image-test:
	vagrant/test-image.sh

lint:
	@tools/bootstrap.sh lint
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
