"""Run settings: the shipped configs, unknown keys and bad types, overrides, and the finetune section's checks."""

from pathlib import Path

import pytest

from herd.train.settings import SettingsError, load_finetune_settings, load_settings, model_args

from .pretrain_utils import write_config

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FINETUNE_CONFIG = ROOT / "configs" / "finetune-tiny.yaml"
DIALOGS = ROOT / "data" / "sft-demo" / "dialogs.jsonl"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    s = load_settings(path)
    assert s.train.batch_size % s.train.micro_batch == 0
    assert model_args(s).max_seq_len >= s.data.seq_len


def test_shipped_configs_exist():
    assert {"pretrain-tiny.yaml", "pretrain-100m.yaml"} <= {p.name for p in CONFIGS}


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1.0e-3\n  learning_rate: 2\n")
    with pytest.raises(SettingsError, match=r"unknown setting optim.learning_rate \(known in optim: lr,"):
        load_settings(cfg)
    cfg.write_text("data: {paths: [x]}\nepochs: 3\n")
    with pytest.raises(SettingsError, match="unknown setting epochs"):
        load_settings(cfg)
    cfg.write_text("data: {paths: [x]}\n")
    with pytest.raises(SettingsError, match="unknown setting train.stepz"):
        load_settings(cfg, ["train.stepz=5"])
    with pytest.raises(SettingsError, match="train.steps: expected int, got 'many'"):
        load_settings(cfg, ["train.steps=many"])
    with pytest.raises(SettingsError, match="not KEY=VALUE"):
        load_settings(cfg, ["train.steps"])
    with pytest.raises(Exception, match="unknown model config keys"):
        load_settings(cfg, ["model.overrides={dimension: 3}"])
    with pytest.raises(SettingsError, match="batch_size 10 is not a multiple of micro_batch 4"):
        load_settings(cfg, ["train.batch_size=10"])


def test_overrides_parse_yaml_values(tmp_path):
    cfg = write_config(tmp_path)
    s = load_settings(cfg, ["optim.lr=3e-4", "train.steps=7", "data.paths=[a, b]", "optim.grad_clip=null",
                            "model.overrides={n_layers: 3}"])
    assert s.optim.lr == 3e-4 and s.train.steps == 7 and s.data.paths == ["a", "b"] and s.optim.grad_clip is None
    assert model_args(s).n_layers == 3


def test_dtype_settings_take_the_long_names_as_aliases(tmp_path):
    cfg = write_config(tmp_path)
    s = load_settings(cfg, ["train.mixed_precision=float32", "export.dtype=bfloat16"])
    assert (s.train.mixed_precision, s.export.dtype) == ("fp32", "bf16")
    s = load_finetune_settings(cfg, ["finetune.base_dtype=float32"])
    assert s.finetune.base_dtype == "fp32"
    with pytest.raises(SettingsError, match="export.dtype must be bf16, fp16 or fp32"):
        load_settings(cfg, ["export.dtype=int4"])


@pytest.mark.parametrize("override, message", [
    ("finetune.method=dora", "finetune.method must be one of full, lora, qlora"),
    ("finetune.packing=zip", "finetune.packing must be pack or pad"),
    ("finetune.bad_data=ignore", "finetune.bad_data must be one of error, skip"),
    ("finetune.lora_rank=0", "finetune.lora_*: LoRA rank must be a positive integer"),
    ("finetune.lora_targets=[attention]", "unknown LoRA target modules"),
    ("finetune.qlora_group_size=48", "finetune.qlora_group_size must be one of"),
    ("export.merged=true", "export.merged needs model.init_from"),
    ("finetune.base_dtype=bf16", "needs train.mixed_precision bf16"),
    ("finetune.lr=1", "unknown setting finetune.lr"),
])
def test_bad_finetune_settings_name_the_key(tmp_path, override, message):
    extra = ["finetune.method=qlora"] if "qlora" in override else []
    with pytest.raises(SettingsError, match=message.replace("*", r"\*")):
        load_finetune_settings(FINETUNE_CONFIG, [f"run_dir={tmp_path / 'run'}", f"data.paths=[{DIALOGS}]", *extra,
                                                 override])


def test_finetune_settings_fill_in_the_default_section_and_expand_home(tmp_path):
    cfg = write_config(tmp_path)  # a pretraining config: no finetune section
    s = load_finetune_settings(cfg, ["model.init_from=~/base"])
    assert s.finetune is not None and s.finetune.method == "lora"
    assert s.model.init_from == str(Path.home() / "base")
    assert load_settings(cfg).finetune is None
