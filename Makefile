# Two commands that work on a fresh machine: `make demo` and `make test` (and `make grpo-demo`).
#
# Two stacks, each pinned by a constraints file that is raised deliberately with the suite green:
#   oldest   Python 3.11, constraints.txt: the oldest jax/flax we support, plus torch 2.13.0 (CPU)
#            for the transformers oracle; runs every test.
#   current  Python 3.12, constraints-current.txt: the newest jax/jaxlib/flax/optax/orbax pip
#            resolves (what Colab has). No torch wheel for it here, so the tests marked `torch`
#            (tests/conftest.py) are deselected there, and counted as such in its summary.
# `make test` installs both, then runs the two suites side by side (each pytest keeps about one
# core busy; the machine has two) and prints each stack's whole log, then a summary line each.
# `make demo [PYTHON=...]` runs on either Python.
SHELL := bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
PYTHON_OLDEST ?= $(shell .ci/find-python 3.11)
PYTHON_CURRENT ?= $(shell .ci/find-python 3.12)
PIP_FLAGS := -q --disable-pip-version-check
# pytest on a venv's interpreter (so subprocesses and notebook kernels use it too)
pytest = JAX_PLATFORMS=cpu $(1)/bin/python -m pytest tests -p no:cacheprovider
LOGS := .ci-logs
EXTRAS_OLDEST := [test,oracle]
EXTRAS_CURRENT := [test]

.PHONY: demo grpo-demo test test-oldest test-current bench clean

# venv DIR, PYTHON, CONSTRAINTS, EXTRAS
define venv
	@test -n "$(2)" || { echo "no interpreter for $(1): set PYTHON_OLDEST / PYTHON_CURRENT"; exit 1; }
	rm -rf $(1)
	$(2) -m venv $(1)
	$(1)/bin/python -m pip install $(PIP_FLAGS) -c $(3) --upgrade pip
	$(1)/bin/python -m pip install $(PIP_FLAGS) -c $(3) -e ".$(4)"
endef

# `make demo` on any Python: a venv per interpreter version, pinned by the stack it belongs to.
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
DEMO_VENV := .venv-$(PYVER)
DEMO_CONSTRAINTS := $(if $(filter 3.11,$(PYVER)),constraints.txt,constraints-current.txt)

$(DEMO_VENV)/.base: $(DEMO_CONSTRAINTS)
	$(call venv,$(DEMO_VENV),$(PYTHON),$(DEMO_CONSTRAINTS),)
	touch $@

demo: $(DEMO_VENV)/.base
	$(DEMO_VENV)/bin/python -m deepseek_jax.demo

# GRPO at toy size: a supervised warm-up on two-digit addition, then GRPO with the math reward;
# held-out accuracy before and after (about ten minutes on two CPU cores).
grpo-demo: $(DEMO_VENV)/.base
	$(DEMO_VENV)/bin/python -m deepseek_jax.grpo_demo

.venv-oldest/.test: constraints.txt pyproject.toml
	$(call venv,.venv-oldest,$(PYTHON_OLDEST),constraints.txt,$(EXTRAS_OLDEST))
	touch $@

.venv-current/.test: constraints-current.txt pyproject.toml
	$(call venv,.venv-current,$(PYTHON_CURRENT),constraints-current.txt,$(EXTRAS_CURRENT))
	touch $@

test-oldest: .venv-oldest/.test
	@mkdir -p $(LOGS)
	@.venv-oldest/bin/python .ci/versions.py oldest | tee $(LOGS)/oldest.log
	$(call pytest,.venv-oldest) | tee -a $(LOGS)/oldest.log

test-current: .venv-current/.test
	@mkdir -p $(LOGS)
	@.venv-current/bin/python .ci/versions.py current | tee $(LOGS)/current.log
	$(call pytest,.venv-current) -m "not torch" | tee -a $(LOGS)/current.log

# The two venvs install side by side too (pip mostly waits on unpacking and the disk).
test:
	@$(MAKE) --no-print-directory -j2 .venv-oldest/.test .venv-current/.test
	@mkdir -p $(LOGS); start=$$(date +%s); \
	for s in oldest current; do \
	  ( rc=0; $(MAKE) --no-print-directory test-$$s > $(LOGS)/$$s.out 2>&1 || rc=$$?; \
	    echo $$rc > $(LOGS)/$$s.rc ) & \
	done; wait; status=0; \
	for s in oldest current; do \
	  echo "==================== $$s stack"; cat $(LOGS)/$$s.out; \
	  [ "$$(cat $(LOGS)/$$s.rc)" = 0 ] || status=1; \
	done; \
	echo "== summary ($$(( $$(date +%s) - start )) s, both stacks side by side;" \
	  "disk free $$(df -h . | awk 'NR==2 {print $$4}'))"; \
	for s in oldest current; do \
	  head -1 $(LOGS)/$$s.log; echo "   $$(tail -1 $(LOGS)/$$s.log) (exit $$(cat $(LOGS)/$$s.rc))"; \
	done; exit $$status

# The benchmark compares with transformers on torch: the oldest stack's venv.
bench: .venv-oldest/.test
	.venv-oldest/bin/python -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[bench]"
	.venv-oldest/bin/python bench/run_all.py

clean:
	rm -rf .venv .venv-* $(LOGS)
