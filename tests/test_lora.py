"""LoRA from outside the model; PEFT-format adapters checked with peft on transformers' LlamaForCausalLM."""

import json

import pytest
import torch
from conftest import herd_from_hf, hf_model

from herd import lora
from herd.checkpoint import save_hf
from herd.loading import load_model
from herd.config import get_config
from herd.model import Transformer


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_starts_at_the_base_and_trains_only_adapters():
    model = Transformer(get_config("tiny"))
    model.init_weights()
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
    names = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "w2"]))
    assert len(names) == 2 * 3
    with torch.no_grad():
        assert torch.equal(model(tokens), ref)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert model.layers[0].attention.wq.lora_b.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_peft_adapter_gives_the_same_logits_in_transformers(tmp_path, name):
    from peft import PeftModel

    args = get_config(name)
    hf = hf_model(args, seed=1)
    ours = herd_from_hf(hf, args)
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    lora.apply_lora(ours, lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=targets))
    _randomize_adapters(ours)
    lora.save_peft(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    tokens = torch.randint(0, args.vocab_size, (2, 15))
    with torch.no_grad():
        theirs = peft_model(tokens).logits
        mine = ours(tokens)
        base = hf_model(args, seed=1)(tokens).logits
    assert (mine - base).abs().max() > 1e-2  # the adapter matters
    assert (theirs - mine).abs().max() <= 1e-5
    # and back: peft's own save loads into herd
    peft_model.save_pretrained(tmp_path / "from_peft")
    again = herd_from_hf(hf_model(args, seed=1), args)
    lora.load_peft(again, tmp_path / "from_peft")
    with torch.no_grad():
        assert (again(tokens) - mine).abs().max() <= 1e-5


def test_merge_lora_cli_path(tmp_path):
    from herd.cli import main

    args = get_config("tiny")
    base = Transformer(args)
    base.init_weights()
    save_hf(base, None, tmp_path / "base")
    tuned = load_model(tmp_path / "base").float()
    lora.apply_lora(tuned, lora.LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=["wq", "wk", "w3"]))
    _randomize_adapters(tuned, seed=3)
    lora.save_peft(tuned, tmp_path / "adapter")
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        want = tuned(tokens)
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    with torch.no_grad():
        assert (merged(tokens) - want).abs().max() <= 1e-5
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "meta"),
                 "--to", "meta"]) == 0
    with torch.no_grad():
        assert (load_model(tmp_path / "meta")(tokens) - want).abs().max() <= 1e-5


def test_bad_configs_and_adapters(tmp_path):
    for bad in (dict(rank=0), dict(alpha=-1), dict(dropout=1.0), dict(targets=["attention"]), dict(targets=[])):
        with pytest.raises(lora.LoRAError):
            lora.LoRAConfig(**bad)
    model = Transformer(get_config("tiny-tied"))
    with pytest.raises(lora.LoRAError, match="tied"):
        lora.apply_lora(model, lora.LoRAConfig(targets=["output"]))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(lora.LoRAError, match="not LORA"):
        lora.load_peft(Transformer(get_config("tiny")), tmp_path / "a")
    m = Transformer(get_config("tiny"))
    lora.apply_lora(m, lora.LoRAConfig(rank=2, targets=["wq"]))
    lora.save_peft(m, tmp_path / "b")
    other = Transformer(get_config("tiny").replace(dim=128, multiple_of=64))
    with pytest.raises(lora.LoRAError, match="shape"):
        lora.load_peft(other, tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(lora.LoRAError, match="safetensors"):
        lora.load_peft(Transformer(get_config("tiny")), tmp_path / "b")


def test_merge_lora_writes_the_bases_tokenizer_and_readable_files(tmp_path):
    import os

    from herd.cli import main
    from herd.tokenizer import write_tiktoken_bpe

    base = Transformer(get_config("tiny"))
    base.init_weights()
    save_hf(base, None, tmp_path / "base")
    write_tiktoken_bpe({bytes([b]): b for b in range(256)}, tmp_path / "base" / "tokenizer.model")
    tuned = load_model(tmp_path / "base").float()
    lora.apply_lora(tuned, lora.LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=["wq"]))
    mask = os.umask(0o022)
    try:
        lora.save_peft(tuned, tmp_path / "adapter")
        assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    finally:
        os.umask(mask)
    out = tmp_path / "out"
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "base" / "tokenizer.model").read_bytes()
    for folder in (out, tmp_path / "adapter"):
        assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o644}
    import herd

    assert herd.load(out).tokenizer.n_words == 512  # chats at once
