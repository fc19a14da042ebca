"""The two kinds of training run herd ships, as recipes for the one loop (herd.train.loop.train).

    train(settings, PRETRAINING)   # herd pretrain: text files, random or init_from weights, HF + Meta export
    train(settings, FINETUNING)    # herd finetune: chat/Alpaca JSONL, full / LoRA / QLoRA, PEFT adapter export
                                   # (settings with a finetune section: load_finetune_settings fills the defaults)

A new kind of run is a new `Recipe` (e.g. `dataclasses.replace(PRETRAINING, loss_function=...)`); the loop stays.
"""

from __future__ import annotations

from . import finetune, pretrain
from .loop import Recipe

PRETRAINING = Recipe(
    name="pretrain",
    prepare_data=pretrain.prepare_data,
    build_model=pretrain.build_model,
    loss_function=pretrain.loss_function,
    eval_loss_function=pretrain.eval_loss_function,
    flops_per_token=pretrain.flops_per_token,
    export=pretrain.export,
)

FINETUNING = Recipe(
    name="finetune",
    prepare_data=finetune.prepare_data,
    build_model=finetune.build_model,
    loss_function=finetune.loss_function,
    eval_loss_function=finetune.loss_function,
    flops_per_token=finetune.flops_per_token,
    export=finetune.export,
)

