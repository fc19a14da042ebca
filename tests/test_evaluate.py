"""Perplexity against transformers on the same weights, and the lm-eval-harness model type on local tasks."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model

from herd.api import load
from herd.cli import main
from herd.config import get_config
from herd.evaluate import perplexity, text_perplexity

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do shake the "
        "darling buds of May, And summer's lease hath all too short a date. ünïcödé 🦙 1234567")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    args = get_config("tiny-llama3-vocab")
    hf = hf_model(args, seed=3)
    d = tmp_path_factory.mktemp("hf") / "m"
    hf.save_pretrained(d)
    return hf, d


def _hf_strided_nll(hf, ids, window, stride):
    """Reference bookkeeping on transformers' logits: each token after the first is scored once, in the first
    window that reaches it, with the context that window gives."""
    x = torch.tensor([ids])
    nll, scored = 0.0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        if end <= scored:
            continue
        with torch.no_grad():
            logits = hf(x[:, begin:end]).logits[0, :-1]
        lp = F.log_softmax(logits.double(), -1).gather(1, x[0, begin + 1 : end, None])[:, 0]
        nll -= float(lp[scored - begin - 1 :].sum())
        scored = end
        if end == len(ids):
            break
    return nll


def test_perplexity_matches_transformers(hf_dir):
    hf, d = hf_dir
    llm = load(d, dtype="float32")
    ids = llm.tokenizer.encode(TEXT, bos=True)
    # one window: transformers' own loss over the whole sequence
    r = text_perplexity(llm, TEXT, window=len(ids), stride=len(ids) - 1)
    with torch.no_grad():
        ref = math.exp(float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    assert r.perplexity == pytest.approx(ref, rel=1e-5)
    assert r.tokens == len(ids) - 1 and r.bytes == len(TEXT.encode())
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2) / r.bytes)
    # sliding windows
    for window, stride in ((16, 8), (12, 11), (20, 1)):
        r = perplexity(llm.model, ids, window=window, stride=stride)
        assert r.nll == pytest.approx(_hf_strided_nll(hf, ids, window, stride), rel=1e-5)
        assert r.tokens == len(ids) - 1


def test_perplexity_bad_arguments(hf_dir):
    llm = load(hf_dir[1], dtype="float32")
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(llm.model, [1])
    with pytest.raises(ValueError, match="stride"):
        perplexity(llm.model, [1, 2, 3], window=4, stride=4)
    with pytest.raises(ValueError, match="empty"):
        text_perplexity(llm, "")


def test_cli_perplexity(hf_dir, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "perplexity", "--model", str(hf_dir[1]), "--file", str(f), "--json", "--window", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["window"] == 16 and out["stride"] == 8 and out["perplexity"] > 1
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    assert main(["eval", "perplexity", "--model", str(hf_dir[1]), "--file", str(tmp_path / "bad.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--model", str(hf_dir[1]), "--file", str(tmp_path / "none.txt")]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "perplexity", "--model", "x", "--file", str(f), "--window", "0"])


# ---- lm-eval-harness -----------------------------------------------------------------------------------------

MC = [
    {"question": "The sky is", "choices": [" blue", " made of cheese", " purple"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " seven"], "answer": 0},
    {"question": "Romeo loved", "choices": [" Juliet", " Hamlet", " nobody at all"], "answer": 0},
]


def _tasks(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in MC) + "\n")
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": TEXT}) + "\n")
    (tmp_path / "herd_tiny_mc.yaml").write_text(f"""task: herd_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (tmp_path / "herd_tiny_ppl.yaml").write_text(f"""task: herd_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {text}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    (tmp_path / "herd_tiny_gen.yaml").write_text(f"""task: herd_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return tmp_path


def _offline_env():
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_lm_eval_tasks_match_direct_computation(hf_dir, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    for k, v in _offline_env().items():
        monkeypatch.setenv(k, v)
    hf, d = hf_dir
    tm = TaskManager(include_path=str(_tasks(tmp_path)))
    res = lm_eval.simple_evaluate(model="herd", model_args=f"model={d},dtype=float32",
                                  tasks=["herd_tiny_mc", "herd_tiny_ppl", "herd_tiny_gen"], task_manager=tm)
    r = res["results"]
    # accuracy from transformers' logits directly
    llm = load(d, dtype="float32")
    tok = llm.tokenizer
    correct = 0
    for doc in MC:
        scores = []
        for choice in doc["choices"]:
            whole, ctx = tok.encode(doc["question"] + choice, bos=True), tok.encode(doc["question"], bos=True)
            x = torch.tensor([whole])
            with torch.no_grad():
                lp = F.log_softmax(hf(x).logits[0, :-1], -1)
            n = len(whole) - len(ctx)
            scores.append(float(lp[-n:].gather(1, x[0, -n:, None]).sum()))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert r["herd_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))
    # rolling loglikelihood: bits per byte of the whole text equals herd's perplexity module
    bpb = text_perplexity(llm, TEXT, window=len(tok.encode(TEXT, bos=True))).bits_per_byte
    assert r["herd_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-4)
    assert "exact_match,none" in r["herd_tiny_gen"]


def test_lm_eval_command_line_knows_herd(hf_dir, tmp_path):
    """`lm_eval --model herd` from the shell (the .pth hook installed by scripts/setup.sh registers it)."""
    tasks = _tasks(tmp_path)
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    out = subprocess.run([lm_eval, "--model", "herd", "--model_args", f"model={hf_dir[1]},dtype=float32",
                          "--tasks", "herd_tiny_mc", "--include_path", str(tasks)],
                         capture_output=True, text=True, env=_offline_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "herd_tiny_mc" in out.stdout and "acc" in out.stdout


def _choice_loglikelihoods(res, task="herd_tiny_mc") -> torch.Tensor:
    """Per (document, choice) loglikelihoods lm-eval got from the model, in document order."""
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([float(r[0]) for s in samples for r in s["filtered_resps"]], dtype=torch.float64)


def test_lm_eval_on_quantized_checkpoints(hf_dir, tmp_path, monkeypatch):
    """`herd quantize` outputs run through the same lm-eval path; int8 stays close to the fp32 model, int4 further."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for k, v in _offline_env().items():
        monkeypatch.setenv(k, v)
    d = hf_dir[1]
    (tmp_path / "tasks").mkdir()
    tm = TaskManager(include_path=str(_tasks(tmp_path / "tasks")))
    lls, bpb = {}, {}
    for dtype in ("fp32", "int8", "int4"):
        path = d
        if dtype != "fp32":
            path = tmp_path / dtype
            assert main(["quantize", str(d), str(path), "--dtype", dtype, "--group-size", "64",
                         "--eval-tokens", "0"]) == 0
        res = lm_eval.simple_evaluate(model="herd", model_args=f"model={path},dtype=float32",
                                      tasks=["herd_tiny_mc", "herd_tiny_ppl"], task_manager=tm, log_samples=True)
        assert 0 <= res["results"]["herd_tiny_mc"]["acc,none"] <= 1
        lls[dtype] = _choice_loglikelihoods(res)
        bpb[dtype] = res["results"]["herd_tiny_ppl"]["bits_per_byte,none"]
    n_choices = sum(len(doc["choices"]) for doc in MC)
    assert all(v.shape == (n_choices,) and torch.isfinite(v).all() for v in lls.values())
    err8 = (lls["int8"] - lls["fp32"]).abs()
    err4 = (lls["int4"] - lls["fp32"]).abs()
    # Summed over continuations of 1-4 tokens; each token's logprob is about -11.8 (a near-uniform random model).
    # Measured: int8 max 0.003 nats, int4 max 0.03 (bits/byte within 3e-5 and 2e-4); the bounds leave 3-6x
    # headroom and still catch a broken quantized path, which moves these by whole nats.
    assert err8.max() < 0.02, err8
    assert err4.max() < 0.1, err4
    assert err4.mean() > err8.mean()  # 4 bits cost more than 8
    assert bpb["int8"] == pytest.approx(bpb["fp32"], rel=1e-3) and bpb["int4"] == pytest.approx(bpb["fp32"], rel=1e-2)
