"""Recipes: what kind of run the loop makes is supplied from outside, as a frozen dataclass of functions."""

import dataclasses
import json

import pytest

from herd.train import FINETUNING, PRETRAINING, Recipe, finetune, loop, pretrain, train

from .pretrain_utils import tiny_settings


def test_the_two_recipes_are_frozen_and_made_of_their_modules_pieces():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRETRAINING.loss_function = finetune.loss_function
    assert (PRETRAINING.name, FINETUNING.name) == ("pretrain", "finetune")
    for recipe, module in ((PRETRAINING, pretrain), (FINETUNING, finetune)):
        for field in ("prepare_data", "build_model", "loss_function", "flops_per_token", "export"):
            assert getattr(recipe, field) is getattr(module, field), (recipe.name, field)
    assert PRETRAINING.eval_loss_function is pretrain.eval_loss_function
    assert FINETUNING.eval_loss_function is finetune.loss_function  # the SFT loss for held-out dialogs too


def test_the_loop_runs_whatever_the_recipe_supplies(tmp_path, monkeypatch):
    """A recipe with its own loss, FLOPs count and export: the loop uses each of them and nothing of pretraining's."""
    exported = []

    def doubled_loss(s, mesh):
        return lambda *a: 2 * pretrain.causal_lm_loss(*a)

    def export(model, s, run_dir, formats):
        exported.append(formats)
        return []

    custom = Recipe(name="custom", prepare_data=pretrain.prepare_data, build_model=pretrain.build_model,
                    loss_function=doubled_loss, eval_loss_function=doubled_loss,
                    flops_per_token=lambda s, args: 1e6, export=export)
    monkeypatch.setattr(loop, "measure_matmul_peak", lambda device, dtype: 1e12)
    plain = train(tiny_settings(tmp_path, "train.steps=1", run="plain"), PRETRAINING)
    res = train(tiny_settings(tmp_path, "train.steps=1", "export.hf=true", run="custom"), custom)
    assert res.losses[1] == 2 * plain.losses[1]  # the same first batch and weights, the recipe's loss
    assert res.val_loss == 2 * plain.val_loss
    assert exported == [["hf"]] and res.exports == []
    row = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["mfu"] == pytest.approx(1e6 * row["tokens_per_s"] / 1e12, rel=1e-9)
