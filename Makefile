# Two commands do everything on a fresh machine:
#   make demo   set up .venv, make synthetic data, check it, train, evaluate, export, serve
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
DEMO_EPOCHS ?= 4
DEMO_PORT ?= 3000
DEMO_SERVE ?= 1

.PHONY: demo test venv bench-met clean strip-notebooks

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "wildcheck needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,backbones]'
	touch $@

demo: venv
	$(BIN)/wildcheck data synth $(DEMO)/data --per-class 40 --size 256 --seed 0
	$(BIN)/wildcheck data check $(DEMO)/data --report $(DEMO)/data_check.json
	$(BIN)/wildcheck train --data $(DEMO)/data --out $(DEMO)/run --epochs $(DEMO_EPOCHS) --img-size 160
	$(BIN)/wildcheck evaluate $(DEMO)/run --data $(DEMO)/data --split test --out $(DEMO)/eval
	$(BIN)/wildcheck export $(DEMO)/run --out $(DEMO)/model.onnx --version demo
	$(BIN)/wildcheck evaluate $(DEMO)/model.onnx --data $(DEMO)/data --split test
ifeq ($(DEMO_SERVE),1)
	@set -e; \
	$(BIN)/wildcheck serve $(DEMO)/model.onnx --port $(DEMO_PORT) & pid=$$!; \
	trap "kill $$pid 2>/dev/null" INT TERM EXIT; \
	for i in $$(seq 120); do curl -sf localhost:$(DEMO_PORT)/readyz >/dev/null && break; sleep 1; done; \
	img=$$(ls $(DEMO)/data/test/ivory/*.jpg | head -1); \
	echo; echo "curl -F image=@$$img http://localhost:$(DEMO_PORT)/v1/check"; \
	curl -sf -F image=@$$img http://localhost:$(DEMO_PORT)/v1/check; echo; \
	echo; echo "serving $(DEMO)/model.onnx on http://localhost:$(DEMO_PORT) (API docs: /v1/docs); Ctrl-C stops it"; \
	wait $$pid
endif

test: venv
	$(BIN)/python -m pytest -q -ra

bench-met: venv
	$(BIN)/python benchmarks/met_ivory.py --out runs/met_ivory

strip-notebooks: venv
	$(BIN)/python notebooks/strip_outputs.py notebooks/*.ipynb

clean:
	rm -rf $(DEMO) runs .pytest_cache
