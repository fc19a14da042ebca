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


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
model: {overrides: {x: *i}}
"""


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    import yaml

    assert len(BILLION_LAUGHS) < 1024  # 1 KB standing for 10^9 strings
    assert yaml.safe_load(BILLION_LAUGHS)["i"][0][0][0] is not None  # what plain safe_load accepts (shared refs)
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BILLION_LAUGHS)
    with pytest.raises(SettingsError, match=r"bomb.yaml:2: invalid YAML: aliases \(\*a\) are not allowed"):
        load_settings(cfg)
    with pytest.raises(SettingsError, match="aliases"):  # an override's value is YAML too
        load_settings(None, ["model.overrides={a: &x [1, 2], b: *x}"])
    cfg.write_text("data: {paths: [x]}\ntrain: &t {steps: 3}\n")  # an anchor alone is harmless
    assert load_settings(cfg).train.steps == 3


def test_deeply_nested_yaml_is_a_located_error(tmp_path):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text("model:\n  overrides: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SettingsError, match=r"deep.yaml:2: invalid YAML: nested more than 64 levels"):
        load_settings(cfg)


# ---- model.init_from decides the model and the tokenizer (issue 21) -------------------------------------------


def _checkpoint(folder: Path, name: str = "tiny", tokenizer: bool = True) -> Path:
    import torch

    from herd.checkpoint import save_hf
    from herd.config import get_config
    from herd.model import Transformer
    from herd.tokenizer import write_tiktoken_bpe

    m = Transformer(get_config(name))
    m.init_weights(0.02, torch.Generator().manual_seed(0))
    save_hf(m, None, folder)
    if tokenizer:
        write_tiktoken_bpe({bytes([b]): b for b in range(256)}, folder / "tokenizer.model")
    return folder


def test_init_from_brings_its_tokenizer_and_replaces_model_name(tmp_path):
    base = _checkpoint(tmp_path / "base")
    common = [f"run_dir={tmp_path / 'run'}", f"data.paths=[{DIALOGS}]", f"model.init_from={base}", "model.name=tiny"]
    s = load_finetune_settings(FINETUNE_CONFIG, common)  # a model.name of the checkpoint's shape is accepted
    assert s.data.tokenizer == str(base)  # data.tokenizer null -> the checkpoint's own
    assert s.model.name is None  # recorded as coming from the checkpoint, not as "tiny"
    assert load_finetune_settings(FINETUNE_CONFIG, [*common, "data.tokenizer=bytes"]).data.tokenizer == "bytes"
    with pytest.raises(SettingsError, match=r"model.name llama-3.2-1b does not match model.init_from .*dim 2048 vs "
                                            r"64.*drop model.name"):
        load_finetune_settings(FINETUNE_CONFIG, [*common, "model.name=llama-3.2-1b"])
    with pytest.raises(SettingsError, match="model.overrides cannot change a model.init_from checkpoint"):
        load_finetune_settings(FINETUNE_CONFIG, [*common, "model.overrides={dim: 128}"])
    # a checkpoint without a tokenizer keeps the Llama 3 vocabulary (null)
    bare = _checkpoint(tmp_path / "bare", "tiny-llama3-vocab", tokenizer=False)
    s = load_finetune_settings(FINETUNE_CONFIG, [*common[:2], f"model.init_from={bare}"])  # the config's name fits
    assert s.data.tokenizer is None and s.model.name is None


def test_the_written_settings_say_what_init_from_decided(tmp_path):
    import yaml

    from herd.train import FINETUNING, train

    base = _checkpoint(tmp_path / "base")
    s = load_finetune_settings(FINETUNE_CONFIG, [
        f"run_dir={tmp_path / 'run'}", f"data.paths=[{DIALOGS}]", f"model.init_from={base}", "model.name=",
        "log.progress=false",
        "log.tensorboard=false", "data.seq_len=64", "train.steps=1", "train.batch_size=1", "train.micro_batch=1",
        "eval.every=0", "eval.sequences=0", "checkpoint.every=0", "export.hf=false", "export.meta=false"])
    train(s, FINETUNING)
    written = yaml.safe_load((tmp_path / "run" / "settings.yaml").read_text())
    assert written["model"]["name"] is None and written["data"]["tokenizer"] == str(base)
