#!/usr/bin/env bash
# Re-train herd's bundled default model from scratch (see docs/default-model.md): the Shakespeare corpus ->
# an 8192-token BPE -> `herd pretrain` (configs/default-pretrain.yaml) -> `herd finetune` on dialogue turns mixed
# with the training plays' text (configs/default-finetune.yaml) -> bf16 weights + tokenizer + card.json into
# src/herd/assets/default/.
# About 45-60 minutes on 2 CPU cores. Run from the repository root after scripts/setup.sh (training needs no test
# extras); run it under `nice -n 19` on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
HERD=.venv/bin/herd
PY=.venv/bin/python
start=$SECONDS
stage() { echo "== [$(( (SECONDS - start) / 60 )) min] $*" >&2; }

rm -rf runs/default-work runs/default-pretrain runs/default-chat
mkdir -p runs/default-work
stage "corpus and tokenizer"
tar xf data/shakespeare/corpus.tar.xz -C runs/default-work
$PY -m herd.bpe --vocab-size 8192 --out runs/default-work/tokenizer.model runs/default-work/train/*.txt
stage "pretraining (configs/default-pretrain.yaml)"
$HERD pretrain --config configs/default-pretrain.yaml
stage "chat stage (configs/default-finetune.yaml)"
$HERD finetune --config configs/default-finetune.yaml
stage "packaging into src/herd/assets/default"
$PY scripts/package_default_model.py runs/default-chat/hf runs/default-work/tokenizer.model \
    --pretrain-run runs/default-pretrain --chat-run runs/default-chat
stage "done: $(( SECONDS - start )) s in all"
