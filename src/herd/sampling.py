"""How the next token is picked, and its log-probability: the one implementation that `herd generate`, the Python
API and the server share.

`SamplingParams` (validated) -> `apply_penalties` (repetition / presence / frequency) -> `logits_to_probs`
(temperature, top-k, min-p, top-p) -> `draw`; `sample` chains them, `chosen_logprobs` reports the raw model's
log-probabilities of the chosen tokens (and the top k). Pure tensor functions: what `torch.compile` sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """Bad generation input (empty prompt, unknown token id, bad sampling parameter)."""



@dataclass
class SamplingParams:
    """How the next token is picked. temperature 0 means greedy (argmax after penalties).

    Defaults are Meta's reference (temperature 0.6, top-p 0.9). Penalties: `repetition_penalty` (CTRL / HF style,
    >1 discourages every token already in the prompt or output), `presence_penalty` and `frequency_penalty`
    (OpenAI style, subtracted from the logits of tokens already generated: once, or once per occurrence).
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens with probability < min_p * p(most likely token)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise GenerationError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


# ---- sampling: pure tensor functions ------------------------------------------------------------------------


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, p: SamplingParams):
    """logits (B, V) fp32; counts (B, V) times each token was generated; in_prompt (B, V) bool."""
    if p.repetition_penalty != 1:
        seen = in_prompt | (counts > 0)
        scaled = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if p.presence_penalty:
        logits = logits - p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts.to(logits.dtype)
    return logits


def logits_to_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k, min-p and top-p (unselected tokens are 0)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if p.top_p < 1:
        # Meta's rule: drop a token when the mass before it (in descending order) already exceeds top_p
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) > p.top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One sample per row, proportional to probs (need not be normalized): argmax of probs / Exp(1) noise."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids."""
    if p.greedy:
        return torch.argmax(logits, dim=-1)
    return draw(logits_to_probs(logits, p), generator)


def chosen_logprobs(raw: torch.Tensor, chosen: torch.Tensor, top: int = 0):
    """raw (B, V) logits before any penalty, chosen (B,) -> (B,) log-probabilities of the chosen tokens, and the
    `top` most likely (torch.topk result over log-probabilities) or None."""
    logp = torch.log_softmax(raw.float(), dim=-1)
    lp = logp.gather(1, chosen.to(logp.device)[:, None])[:, 0]
    return lp, (torch.topk(logp, top, dim=-1) if top else None)
