#!/usr/bin/env bash
# Re-train herd's bundled default model from scratch (see docs/default-model.md): the Shakespeare corpus ->
# an 8192-token BPE -> `herd pretrain` (configs/default-pretrain.yaml) -> `herd finetune` on dialogue turns
# (configs/default-finetune.yaml) -> bf16 weights + tokenizer into src/herd/assets/default/.
# About 45-60 minutes on 2 CPU cores. Run from the repository root after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
HERD=.venv/bin/herd
PY=.venv/bin/python
rm -rf runs/default-work runs/default-pretrain runs/default-chat
mkdir -p runs/default-work
tar xf data/shakespeare/corpus.tar.xz -C runs/default-work
$PY -m herd.bpe --vocab-size 8192 --out runs/default-work/tokenizer.model runs/default-work/train/*.txt
$HERD pretrain --config configs/default-pretrain.yaml
$HERD finetune --config configs/default-finetune.yaml
$PY scripts/package_default_model.py runs/default-chat/hf runs/default-work/tokenizer.model \
    --pretrain-run runs/default-pretrain --chat-run runs/default-chat
