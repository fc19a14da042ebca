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
