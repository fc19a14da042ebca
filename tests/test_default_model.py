"""The bundled default model: its golden continuation, a chat round trip, its held-out perplexity, and the
commands that use it when no --model is given. The golden ids and the perplexity bound come from card.json, which
`scripts/package_default_model.py` recorded from these weights when it packaged them."""

import json

import pytest

from herd import default_model as dm
from herd.api import load
from herd.cli import main
from herd.evaluate import perplexity


@pytest.fixture(scope="module")
def llm():
    return load(None, dtype="float32", device="cpu")


def test_architecture_and_size():
    card = dm.card()
    cfg = card["config"]
    assert 5e6 <= card["parameters"] <= 20e6
    assert cfg["n_kv_heads"] < cfg["n_heads"] and cfg["use_scaled_rope"] and cfg["tie_embeddings"]
    assert (dm.DEFAULT_DIR / "model.safetensors").stat().st_size <= 40e6


def test_golden_greedy_continuation(llm):
    card = dm.card()
    out = llm.generate(card["golden_prompt"], max_new_tokens=len(card["golden_ids"]), temperature=0.0,
                       stop_token_ids=[])
    assert out.token_ids == card["golden_ids"]


def test_chat_round_trip(llm):
    reply = llm.chat([{"role": "user", "content": "Good morrow, my lord. How fares the king?"}],
                     max_new_tokens=60, temperature=0.0)
    assert reply.message.role == "assistant" and reply.message.content.strip()
    # the chat fine-tune taught it to end its turn with <|eot_id|>
    assert reply.message.stop_reason == "end_of_turn"
    assert "<|" not in reply.message.content


def test_held_out_perplexity_stays_below_the_recorded_value(llm):
    card = dm.card()
    ids = llm.tokenizer.encode(dm.validation_text(), bos=True)[: card["val_tokens"] + 1]
    ppl = perplexity(llm.model, ids, window=card["val_window"], stride=card["val_window"] // 2).perplexity
    assert ppl <= card["val_ppl"] * 1.01
    assert ppl < 1000  # far below a uniform guess over 8,448 ids


def test_commands_default_to_it(capsys):
    assert main(["generate", "--prompt", "KING:", "--max-new-tokens", "8", "--temperature", "0", "--ids"]) == 0
    out = capsys.readouterr()
    assert "using herd's bundled default model" in out.err
    assert len(json.loads(out.out.strip().splitlines()[-1])) == 8


# ---- a model that writes and chats, and commands whose defaults mean something (issue 21) ----------------------


def test_plain_generate_continues_prose(capsys):
    """The README's `herd generate --prompt "Once upon a time"`: the chat stage kept the model writing text."""
    assert main(["generate", "--prompt", "Once upon a time", "--max-new-tokens", "48", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    words = [w for w in text.split() if any(c.isalpha() for c in w)]
    assert len(words) >= 8, text  # a sentence, not "!"


def test_card_records_the_training_window_and_the_measured_mix():
    card = dm.card()
    assert card["train_seq_len"] == card["val_window"] == 512
    # the chat stage kept prose (within 10% of the pretrained model's held-out perplexity, measured alike)
    assert card["val_ppl"] <= 1.10 * card["pretrain_macbeth_ppl"]
    assert card["chat_val_ppl"] <= 57.3  # held-out dialog replies: no worse than the chat-only stage


def test_eval_perplexity_defaults_to_the_bundled_model_and_its_window(tmp_path, capsys):
    f = tmp_path / "macbeth.txt"
    f.write_text(dm.validation_text()[:6000], encoding="utf-8")
    assert main(["eval", "perplexity", "--file", str(f), "--json"]) == 0
    out = capsys.readouterr()
    assert "using herd's bundled default model" in out.err
    r = json.loads(out.out)
    assert r["window"] == 512 and r["stride"] == 256 and 1 < r["perplexity"] < 1000


def test_quantize_reports_on_the_held_out_plays(tmp_path, capsys):
    assert main(["quantize", str(dm.DEFAULT_DIR), str(tmp_path / "q8"), "--dtype", "int8",
                 "--eval-tokens", "256"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert "held-out Macbeth" in report["eval_text"] and "held-out Macbeth" in out.err
    assert report["ppl_bf16"] < 1000 and abs(report["ppl_change_pct"]) < 5
    assert (tmp_path / "q8" / "tokenizer.model").is_file()
