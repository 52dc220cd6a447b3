# Every target creates .venv and installs the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# The CPU wheel; override on a GPU box, e.g. `make demo TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed

.PHONY: demo results results-lang1 results-wikitext gpu-recipe test test-slow test-browser lint bench gpu-check sweep lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)  ## ES, NES and GDES on the embedded synthetic corpus, then the tug-of-war analysis
	$(PY) -m lab sweep --pretrain.corpus synthetic --out-dir runs/demo

# The recipes pin the AVX2 CPU kernels (lab experiment re-executes itself with ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) and one thread per run (two runs at once), so any
# x86-64 machine with AVX2 gives the same digits, whatever its core count. The results pages:
# figures/experiment_synthetic/, figures/experiment_synthetic_lang1/, figures/experiment_wikitext2/.
results: $(STAMP)  ## ES/NES/GDES (+ untrained control) x 10 pre-training x 2 fine-tuning seeds, synth_gram + synth_tag (<= 60 min, 2 cores)
	$(PY) -m lab experiment --recipe cpu-results $(ARGS)

results-lang1: $(STAMP)  ## the same recipe on a second synthetic language, its verdicts beside the first's
	$(PY) -m lab experiment --recipe cpu-results-lang1 $(ARGS)

results-wikitext: $(STAMP)  ## WikiText-2 x 3 pre-training seeds (+ control), GLUE CoLA/SST-2/STS-B; needs $$LAB_DATA_DIR
	$(PY) -m lab experiment --recipe cpu-wikitext $(ARGS)

# On a GPU box with system python3 (CUDA torch, transformers, sentencepiece, safetensors, scikit-learn,
# scipy, tqdm) and no venv: `make gpu-recipe DATA=/path/with/wikitext-2/and/glue`.
GPU_PYTHON ?= python3
DATA ?= $(LAB_DATA_DIR)
gpu-recipe:  ## xsmall on WikiText-2, ES/NES/GDES x 3 pre-training seeds, CoLA/SST-2/STS-B x 3 fine-tuning seeds (<= 10 min, one H100)
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m lab experiment --recipe gpu --data-dir "$(DATA)" $(ARGS)

sweep: $(STAMP)
	$(PY) -m lab sweep $(ARGS)

test: $(STAMP) lint  ## the full default suite: tests/ and the committed notebooks (nbval)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests --nbval-lax notebooks

test-slow: $(STAMP)  ## the tests marked slow (minutes each; .ci/run runs them after `make test`)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

# JupyterLab in headless Chromium: every notebook run from the browser, the tour's widgets used
# (tests/browser/). Needs a Chromium executable: Debian's `chromium` package, or LAB_CHROMIUM=PATH.
test-browser: $(STAMP)
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q -e ".[dev,browser]"
	$(PY) -m pytest -q -m browser $(PYTEST_ARGS) tests/browser

lint: $(STAMP)
	$(VENV)/bin/ruff check lab tests
	$(VENV)/bin/ruff format --check lab tests

bench: $(STAMP)
	$(PY) -m lab bench $(ARGS)

# On a lent GPU machine, with its system python3 and nothing installed (no $(STAMP)): the prepared
# check, at most 8 minutes. First, here: `python -m lab gpucheck --prepare-data` copies the data it
# reads from $$LAB_DATA_DIR into the git-ignored .gpudata/ and trains its tokenizers there; that folder
# goes along with the checkout; there:
# `make gpu-check OUT=$$OUT` = PYTHONPATH=. python3 -m lab gpucheck --out-dir $$OUT --data-dir .gpudata
gpu-check:
	PYTHONPATH=. $(PYTHON) -m lab gpucheck --out-dir $(or $(OUT),runs/gpucheck) --data-dir .gpudata

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
