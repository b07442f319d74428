# Two commands a newcomer needs: `make run` and `make test`. Both install what is missing first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := /usr/share/tuxpaint/stamps
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
# pytest arguments, e.g. make test PYTEST_ARGS="-k svm"
PYTEST_ARGS ?=

.PHONY: install run test ui lint dataset clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first: pip takes the pinned build from local disk where it is there
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	@touch $@

install: $(VENV)/.installed

# The default dataset: real photos from Debian's tuxpaint-stamps-default.
dataset:
	@if [ ! -d $(STAMPS) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing the default dataset (Debian tuxpaint-stamps-default)"; \
	    apt-get update -q && apt-get install -y -q --no-install-recommends tuxpaint-stamps-default; \
	  else \
	    echo "The default dataset needs Debian's tuxpaint-stamps-default: run" \
	         "'sudo apt-get install --no-install-recommends tuxpaint-stamps-default', or point" \
	         "data.source in params.yaml at your own folder: {kind: folder, path: /my/images}"; \
	    exit 1; \
	  fi; \
	fi

run: install dataset
	transferlab run

test: install
	pytest -m "not gpu" $(PYTEST_ARGS)

ui: install
	transferlab ui

lint: install
	ruff check . && ruff format --check .

clean:
	rm -rf data features models metrics plots reports .transferlab
