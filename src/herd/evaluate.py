"""Evaluation: sliding-window perplexity and bits per byte, and an lm-evaluation-harness model type ("herd").

Perplexity follows the usual strided evaluation: windows of `window` tokens start every `stride` tokens, and each
window scores only the tokens no earlier window scored, so every token after BOS is predicted exactly once with up
to `window - stride` tokens of context. Bits per byte divide the same total negative log-likelihood (in bits) by the
UTF-8 length of the text, which makes numbers comparable across tokenizers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import Transformer


@dataclass
class PerplexityResult:
    tokens: int  # tokens scored (all but the first)
    bytes: int
    nll: float  # total negative log-likelihood in nats
    perplexity: float
    bits_per_byte: float
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def no_kv_cache(model: Transformer):
    """Full-sequence forwards on a model whose generation engine keeps KV caches allocated between calls."""
    saved = [layer.attention.cache for layer in model.layers]
    model.clear_caches()
    try:
        yield model
    finally:
        for layer, cache in zip(model.layers, saved):
            layer.attention.cache = cache


@torch.no_grad()
def token_logprobs(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """ids: (B, T) -> log p(ids[:, t] | ids[:, :t]) for t >= 1, shape (B, T-1), float32."""
    with no_kv_cache(model):
        logits = model(ids[:, :-1])
    return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]


@torch.no_grad()
def perplexity(
    model: Transformer,
    ids: list[int],
    *,
    n_bytes: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Strided perplexity of a token sequence (ids[0] is context only, normally BOS)."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    window = window or min(model.args.max_seq_len, 2048)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1], got stride {stride} with window {window}")
    if window > model.args.max_seq_len:
        raise ValueError(f"window {window} exceeds the model context {model.args.max_seq_len}")
    device = model.tok_embeddings.weight.device
    seq = torch.tensor(ids, device=device)
    n = len(ids)
    nll, scored = 0.0, 1  # position 0 is never predicted
    starts = range(0, n - 1, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + window, n)
        if end <= scored:
            continue
        lp = token_logprobs(model, seq[None, begin:end])[0]  # predictions for positions begin+1 .. end-1
        fresh = lp[scored - begin - 1 :]
        nll -= float(fresh.double().sum())
        scored = end
        if end == n:
            break
    tokens = n - 1
    n_bytes = n_bytes if n_bytes is not None else tokens
    return PerplexityResult(tokens=tokens, bytes=n_bytes, nll=nll, perplexity=math.exp(nll / tokens),
                            bits_per_byte=nll / math.log(2) / max(1, n_bytes), window=window, stride=stride)


def text_perplexity(llm, text: str, **kw) -> PerplexityResult:
    """Perplexity of `text` under an api.LLM (BOS + the text's tokens)."""
    if not text:
        raise ValueError("the text is empty")
    ids = llm.tokenizer.encode(text, bos=True)
    return perplexity(llm.model, ids, n_bytes=len(text.encode("utf-8")), **kw)


# ---- lm-evaluation-harness -----------------------------------------------------------------------------------


def _lm_base():
    from lm_eval.api.model import LM

    return LM


def make_lm_class():
    """The lm-eval `LM` subclass, built lazily so that herd does not import lm_eval unless asked to."""

    class HerdLM(_lm_base()):
        """lm-eval model type "herd": `lm_eval --model herd --model_args model=PATH[,dtype=bf16,device=cpu]`."""

        def __init__(self, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                     max_length: int | None = None, batch_size: int | str = 1, llm=None, **_ignored):
            super().__init__()
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm_eval's command line asks for cuda by default
            if llm is None:
                from .api import load

                if model is None:
                    raise ValueError("--model_args needs model=PATH")
                llm = load(model, dtype=dtype, device=device)
            self.llm = llm
            self.max_length = max_length or min(llm.model.args.max_seq_len, 4096)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            kw = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            for k, v in (additional_config or {}).items():  # lm-eval's own --device/--batch_size: model_args win
                if v is not None and k not in kw:
                    kw[k] = v
            return cls(**kw)

        # lm-eval requests carry `.args`
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            for req in tqdm(requests, desc="loglikelihood", disable=len(requests) < 50):
                context, continuation = req.args
                out.append(self._continuation_logprob(context, continuation))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for req in requests:
                (text,) = req.args
                ids = self.llm.tokenizer.encode(text, bos=True)
                r = perplexity(self.llm.model, ids, window=min(self.max_length, len(ids)),
                               stride=max(1, min(self.max_length, len(ids)) - 1))
                out.append(-r.nll)
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for req in requests:
                context, gen = req.args
                until = gen.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                temperature = gen.get("temperature", 0.0) if gen.get("do_sample", False) else 0.0
                c = self.llm.generate(context, max_new_tokens=int(gen.get("max_gen_toks", 256)), stop=until or None,
                                      temperature=temperature)
                out.append(c.text)
            return out

        def _continuation_logprob(self, context: str, continuation: str) -> tuple[float, bool]:
            # Split on the whole string, as lm-eval's HF model does: a leading space belongs to the continuation.
            tok = self.llm.tokenizer
            whole = tok.encode(context + continuation, bos=True)
            ctx = tok.encode(context, bos=True)
            n_cont = max(1, len(whole) - len(ctx))
            ids = whole[-(self.max_length + 1):]
            device = self.llm.model.tok_embeddings.weight.device
            x = torch.tensor([ids], device=device)
            with torch.no_grad(), no_kv_cache(self.llm.model):
                logits = self.llm.model(x[:, :-1])[0, -n_cont:]
            target = x[0, -n_cont:]
            lp = F.log_softmax(logits, dim=-1)
            total = float(lp.gather(1, target[:, None]).sum())
            greedy = bool((logits.argmax(-1) == target).all())
            return total, greedy

    return HerdLM


def register_lm_eval() -> None:
    """Register the "herd" model type with lm-eval (idempotent)."""
    from lm_eval.api.registry import model_registry

    import lm_eval.models  # noqa: F401  (keeps lm-eval's own models registered alongside)

    if "herd" not in model_registry:
        model_registry.register("herd", target="herd.evaluate:HerdLM")


def __getattr__(name: str):
    if name == "HerdLM":  # resolved by lm-eval's lazy registry entry "herd.evaluate:HerdLM"
        cls = make_lm_class()
        globals()["HerdLM"] = cls
        return cls
    raise AttributeError(name)


def run_lm_eval(argv: Iterable[str]) -> int:
    """`herd eval tasks ...`: lm-eval's own command line with the "herd" model type registered."""
    import sys

    register_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0
