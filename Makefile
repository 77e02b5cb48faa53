# Two commands do everything on a fresh machine:
#   make demo   set up .venv; the training walkthrough on synthetic data (synth, check, train, evaluate,
#               export); then serve the shipped ivory model and check the example photos over HTTP
#   make test   set up .venv, run the test suite
#   make model  reproduce the shipped model models/wildcheck-ivory.onnx from ../shared (two trainings: a GPU, or ~4 h on 2 cores)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
DEMO_EPOCHS ?= 4
DEMO_PORT ?= 3000
DEMO_SERVE ?= 1
MODEL ?= models/wildcheck-ivory.onnx
# test processes (pytest-xdist), each given whole files (a module's fixtures are built once): 2 for 2 cores
TEST_WORKERS ?= 2

.PHONY: demo test venv model bench-met clean strip-notebooks

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "wildcheck needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,test,backbones]'
	touch $@

demo: venv
	@echo "== 1/2 training walkthrough on SYNTHETIC data (drawn shapes: shows the steps, not a real model) =="
	$(BIN)/wildcheck data synth $(DEMO)/data --per-class 40 --size 256 --seed 0
	$(BIN)/wildcheck data check $(DEMO)/data --report $(DEMO)/data_check.json
	$(BIN)/wildcheck train --data $(DEMO)/data --out $(DEMO)/run --epochs $(DEMO_EPOCHS) --img-size 160
	$(BIN)/wildcheck evaluate $(DEMO)/run --data $(DEMO)/data --split test --out $(DEMO)/eval
	$(BIN)/wildcheck export $(DEMO)/run --out $(DEMO)/model.onnx --version demo
	$(BIN)/wildcheck evaluate $(DEMO)/model.onnx --data $(DEMO)/data --split test
ifeq ($(DEMO_SERVE),1)
	@echo; echo "== 2/2 the shipped ivory model $(MODEL) checks the example photos (examples/, The Met, CC0) over HTTP =="
	@test -f $(MODEL) || { echo "$(MODEL) is missing: run 'make model' (needs ../shared/datasets)"; exit 1; }
	@set -e; mkdir -p $(DEMO); \
	$(BIN)/wildcheck serve $(MODEL) --port $(DEMO_PORT) > $(DEMO)/serve.log 2>&1 & pid=$$!; \
	trap "kill $$pid 2>/dev/null" INT TERM EXIT; \
	for i in $$(seq 120); do curl -sf localhost:$(DEMO_PORT)/readyz >/dev/null && break; sleep 1; done; \
	curl -sf localhost:$(DEMO_PORT)/readyz >/dev/null || { tail -20 $(DEMO)/serve.log; echo "the server did not start"; exit 1; }; \
	echo; echo "curl -F image=@examples/<photo>.jpg http://localhost:$(DEMO_PORT)/v1/check"; \
	printf '%-22s %-9s %-8s %s\n' photo "Met label" decision "ivory score"; \
	for img in examples/*.jpg; do \
		name=$$(basename $$img); case $$name in non_ivory_*) truth=other;; *) truth=ivory;; esac; \
		printf '%-22s %-9s ' $$name $$truth; \
		curl -sf -F image=@$$img http://localhost:$(DEMO_PORT)/v1/check \
			| $(BIN)/python -c 'import json,sys; r=json.load(sys.stdin); print("%-8s %.3f" % (r["decision"], r["scores"]["ivory"]))'; \
	done; \
	echo; echo "serving $(MODEL) on http://localhost:$(DEMO_PORT) (API docs: /v1/docs, log: $(DEMO)/serve.log); Ctrl-C stops it"; \
	wait $$pid
endif

# The shipped model: the documented recipe on ../shared/datasets (Met ivory + negatives) with two seeds,
# each then fine-tuned 3 epochs at a lower lr and at 320 px on the original photos (the same config with
# $(FINETUNE)), each given a second head for photos without colour (wildcheck grey-head: ~10 min each on
# 2 cores), their logits averaged into one model that reads blurred or noisy photos at 256 px (wildcheck
# ensemble --size-route 256, which calibrates it), then export.
# On a GPU each training takes ~4 min; on 2 CPU cores about 2 hours (the fine-tune ~12 min, 12.5 GB RAM).
FINETUNE := --set train.epochs=3 --set train.lr=0.0002 --set train.warmup_epochs=0.2 --set data.img_size=320
model: venv
	$(BIN)/python benchmarks/met_ivory.py --seed 42 --out runs/ship_s42
	$(BIN)/python benchmarks/met_ivory.py --seed 7 --out runs/ship_s7
	$(BIN)/python benchmarks/met_ivory.py $(FINETUNE) --seed 42 --init-from runs/ship_s42 --out runs/ship_s42_ft
	$(BIN)/python benchmarks/met_ivory.py $(FINETUNE) --seed 7 --init-from runs/ship_s7 --out runs/ship_s7_ft
	$(BIN)/wildcheck grey-head runs/ship_s42_ft --out runs/ship_s42_grey
	$(BIN)/wildcheck grey-head runs/ship_s7_ft --out runs/ship_s7_grey
	$(BIN)/wildcheck ensemble runs/ship_s42_grey runs/ship_s7_grey --out runs/ship --size-route 256
	$(BIN)/wildcheck export runs/ship --out $(MODEL) --name wildcheck-ivory --version 1.6.0

test: venv
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

bench-met: venv
	$(BIN)/python benchmarks/met_ivory.py --out runs/met_ivory

strip-notebooks: venv
	$(BIN)/python notebooks/strip_outputs.py notebooks/*.ipynb

clean:
	rm -rf $(DEMO) runs .pytest_cache
