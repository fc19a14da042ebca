"""Training: `herd pretrain` and `herd finetune` on one loop, for a laptop CPU or `torchrun` GPUs.

    from herd.train import PRETRAINING, load_settings, train
    result = train(load_settings("configs/pretrain-tiny.yaml", ["train.steps=5"]), PRETRAINING)

Modules: settings (RunSettings from YAML + overrides, validation), loop (the loop, `Recipe`), recipes (PRETRAINING,
FINETUNING), pretrain and finetune (the recipes' pieces), data (token cache, packing, loader), sft (chat/Alpaca
records, loss masks), parallel (FSDP2, TP, activation checkpointing, compile), dcp (training checkpoints and the
final export), metrics (metrics.jsonl, TensorBoard, MFU's matmul peak, `herd plot`).
"""

from .loop import Recipe, TrainingDiverged, TrainResult, train
from .recipes import FINETUNING, PRETRAINING
from .settings import RunSettings, SettingsError, load_finetune_settings, load_settings

__all__ = ["FINETUNING", "PRETRAINING", "Recipe", "RunSettings", "SettingsError", "TrainResult", "TrainingDiverged",
           "load_finetune_settings", "load_settings", "train"]
