"""Fine-tuning data: the loss mask token by token, multi-turn and tool calls, packing, and bad records."""

import json

import numpy as np
import pytest

from herd.chat_format import ChatFormat
from herd.tokenizer import load_tokenizer
from herd.train.data import IGNORE_INDEX, DataError
from herd.train.sft import SFTDataset, load_sft, split_samples, tokenize_dialog


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(load_tokenizer())


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]


def test_mask_is_exactly_the_assistant_replies(chat):
    tok = chat.tokenizer
    ids, mask = tokenize_dialog(chat, DIALOG)
    assert ids == chat.encode_dialog_prompt(DIALOG, add_generation_prompt=False)
    trained = [[]]
    for i, m in zip(ids, mask):
        if m:
            trained[-1].append(i)
        elif trained[-1]:
            trained.append([])
    trained = [t for t in trained if t]
    # three assistant turns, each its content (or tool call) and its end token, and nothing else
    assert tok.decode(trained[0]) == "Hello!<|eot_id|>"
    assert tok.decode(trained[1]) == '<|python_tag|>{"type": "function", "name": "get_weather", ' \
                                     '"parameters": {"city": "Paris"}}<|eom_id|>'
    assert tok.decode(trained[2]) == "21 degrees.<|eot_id|>"
    assert len(trained) == 3
    # headers are never trained
    for k, i in enumerate(ids):
        if i in (tok.start_header_id, tok.end_header_id, tok.bos_id):
            assert not mask[k]


def test_llama_native_tool_call_form(chat):
    d = [{"role": "user", "content": "search"},
         {"role": "assistant", "content": "", "tool_calls": [{"call_id": "1", "tool_name": "brave_search",
                                                             "arguments": {"query": "llamas"}}]}]
    ids, mask = tokenize_dialog(chat, d)
    text = chat.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert text == '<|python_tag|>brave_search.call(query="llamas")<|eom_id|>'


def test_special_token_text_is_trained_as_text(chat):
    d = [{"role": "user", "content": "say <|eot_id|>"}, {"role": "assistant", "content": "ok <|eot_id|> done"}]
    ids, mask = tokenize_dialog(chat, d)
    tok = chat.tokenizer
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained.count(tok.eot_id) == 1 and trained[-1] == tok.eot_id  # only the real end of turn


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_alpaca_and_chat_files_and_packing(chat, tmp_path):
    jl = _write(tmp_path / "d.jsonl", [json.dumps({"messages": DIALOG[1:3]}), json.dumps({"messages": DIALOG})])
    al = tmp_path / "a.json"
    al.write_text(json.dumps([{"instruction": "Add", "input": "2+2", "output": "4"}]))
    samples, stats = load_sft([jl, al], chat, seq_len=256)
    assert stats.samples == 3 and not stats.skipped
    ds = SFTDataset(samples, 256, chat.tokenizer.pad_id, mode="pack")
    assert len(ds) == 1
    inputs, labels, positions = ds[0]
    n0 = len(samples[0][0]) - 1
    assert positions[0] == 0 and positions[n0] == 0 and positions[n0 - 1] == n0 - 1  # restart per dialog
    # labels are the next tokens where the mask says so
    ids0, mask0 = samples[0]
    want = [t if m else IGNORE_INDEX for t, m in zip(ids0[1:], mask0[1:])]
    assert labels[:n0].tolist() == want
    pad = SFTDataset(samples, 256, chat.tokenizer.pad_id, mode="pad")
    assert len(pad) == 3 and len(pad[0]) == 2 and (pad[0][1][n0:] == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"messages": [{"role": "user", "content": "a"}', "invalid JSON"),
        ('{"messages": [{"role": "user", "content": NaN}]}', "invalid JSON"),
        ('{"messages": [{"role": "assistant", "content": "first"}]}', "must follow"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "must follow"),
        ('{"messages": [{"role": "wizard", "content": "a"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "string"),
        ('[1, 2]', "JSON object"),
        ('{"prompt": "x"}', "needs 'messages'"),
    ],
)
def test_bad_records_error_with_line_number_or_skip(chat, tmp_path, line, reason):
    good = json.dumps({"messages": DIALOG[1:3]})
    f = _write(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(DataError, match=rf"d.jsonl:2: .*{reason}"):
        load_sft([f], chat, seq_len=128)
    samples, stats = load_sft([f], chat, seq_len=128, policy="skip")
    assert stats.samples == 2 and sum(stats.skipped.values()) == 1


def test_file_level_problems(chat, tmp_path):
    good = json.dumps({"messages": DIALOG[1:3]})
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\r\n" + good.encode())  # BOM, CRLF, no final newline
    assert load_sft([bom], chat, seq_len=128)[1].samples == 2
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match="bin.jsonl:2: invalid UTF-8"):
        load_sft([bad], chat, seq_len=128)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable samples"):
        load_sft([empty], chat, seq_len=128)
    with pytest.raises(DataError, match="no such file"):
        load_sft([tmp_path / "missing.jsonl"], chat, seq_len=128)


def test_huge_line_is_bounded(chat, tmp_path, monkeypatch):
    import herd.train.sft as sft

    monkeypatch.setattr(sft, "MAX_LINE_BYTES", 1000)
    good = json.dumps({"messages": DIALOG[1:3]})
    f = tmp_path / "big.jsonl"
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}) + "\n" + good + "\n")
    with pytest.raises(DataError, match="big.jsonl:2: line longer"):
        load_sft([f], chat, seq_len=128)
    assert load_sft([f], chat, seq_len=128, policy="skip")[1].samples == 2


def test_truncation_and_no_trainable_tokens(chat, tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "yes"}]}
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 100}]}
    f = _write(tmp_path / "d.jsonl", [json.dumps(long), json.dumps(ok)])
    samples, stats = load_sft([f], chat, seq_len=64)
    # the long prompt fills the window before any reply: no trainable token, skipped and counted (never a NaN loss)
    assert stats.skipped["no trainable tokens"] == 1 and stats.truncated == 2 and stats.samples == 1
    assert len(samples[0][0]) == 65
    train, val = split_samples(samples * 10, 0.2)
    assert len(val) == 2 and len(train) == 8


def test_packed_rows_never_exceed_seq_len(chat):
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(50):
        n = int(rng.integers(3, 40))
        samples.append((list(range(n)), [bool(x) for x in rng.integers(0, 2, n)]))
    ds = SFTDataset(samples, 64, 0, mode="pack")
    covered = 0
    for j in range(len(ds)):
        inputs, labels, positions = ds[j]
        assert len(inputs) == 64
        covered += int((positions == 0).sum()) if j < len(ds) else 0
    assert covered >= 50  # every dialog starts a fresh position run


@pytest.mark.parametrize("line, reason", [
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "too deeply nested"),
    ('{"messages": [{"role": "user", "content": "a"}], "n": ' + "7" * 5000 + "}", "more than 100 digits"),
    ('{"messages": [{"role": "user", "content": 1e999}]}', "out of range"),
])
def test_hostile_records_are_located_errors_or_skipped(chat, tmp_path, line, reason):
    good = json.dumps({"messages": DIALOG[1:3]})
    f = _write(tmp_path / "d.jsonl", [good, good, line, good])
    with pytest.raises(DataError, match=rf"d.jsonl:3: .*{reason}"):
        load_sft([f], chat, seq_len=128)
    _, stats = load_sft([f], chat, seq_len=128, policy="skip")  # RecursionError used to escape even here
    assert stats.samples == 3 and sum(stats.skipped.values()) == 1


def test_deeply_nested_json_file_is_a_located_error(chat, tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[\n" + json.dumps({"messages": DIALOG[1:3]}) + ",\n" + "[" * 100_000 + "]" * 100_000 + "\n]")
    with pytest.raises(DataError, match=r"d.json:3: too deeply nested"):
        load_sft([f], chat, seq_len=128)
