# drtool: the two set-up commands are `make demo` and `make test` (see README.md).
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /var/tmp/drtool-demo

.PHONY: install test demo docs bench bench-zfs bench-rbd bench-parity bench-upload bench-platform bench-drill clean-demo

install:
	@scripts/install-deps.sh

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	@DEMO_DIR=$(DEMO_DIR) scripts/demo.sh

docs: install
	$(PY) -m drtool.policy docs

bench: install
	$(PY) bench/backup_overhead.py $(BENCH_ARGS)

bench-zfs: install
	$(PY) bench/zfs_replication.py

bench-rbd: install
	$(PY) bench/rbd_replication.py

bench-parity: install
	$(PY) bench/parity_overhead.py

bench-upload: install
	$(PY) bench/upload_throughput.py

bench-platform: install
	$(PY) bench/etcd_verify.py
	$(PY) bench/vault_verify.py

bench-drill: install
	$(PY) bench/drill_restore.py

clean-demo:
	rm -rf $(DEMO_DIR)
