"""GGUF vocabularies and chat templates: herd's tokenizer as llama.cpp's byte-level BPE keys (with the merge list
llama.cpp wants), the reverse (a checked herd Tokenizer from a file's keys), and sandboxed template rendering.
The file format itself (reader, writer, tensor types) is gguf.py.
"""

from __future__ import annotations

import os
from typing import Any

from .gguf import STRING, GGUFError, GGUFFile


def tokenizer_metadata(tokenizer) -> dict[str, Any]:
    """GGUF tokenizer keys for a herd Tokenizer (byte-level BPE, llama.cpp's "gpt2" model, "llama-bpe" split)."""
    from .tokenizer import byte_to_unicode

    table = byte_to_unicode()
    as_text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    ranks = {tokenizer.token_bytes(i): i for i in range(tokenizer.n_base)}
    tokens = [as_text(tokenizer.token_bytes(i)) for i in range(tokenizer.n_base)]
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    tokens += [name for name, _ in specials]
    types = [1] * tokenizer.n_base + [3] * len(specials)  # 1 normal, 3 control
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{as_text(a)} {as_text(b)}" for a, b in merges_from_ranks(ranks)],
        "tokenizer.ggml.bos_token_id": tokenizer.bos_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.eot_token_id": tokenizer.eot_id,
        "tokenizer.ggml.eom_token_id": tokenizer.eom_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": True,
    }


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list implied by tiktoken ranks: each multi-byte token is produced by merging any split of it
    into two tokens; merges are ordered by the rank of the token they produce, then by the ranks of the parts."""
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        splits.sort(key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))
        merges.extend((rank, a, b) for a, b in splits)
    merges.sort(key=lambda m: m[0])
    return [(a, b) for _, a, b in merges]


def read_gguf_tokenizer(path: str | os.PathLike):
    """A herd Tokenizer from the file's byte-level BPE vocabulary, with every id checked against the vocab size."""
    from .tokenizer import Tokenizer, TokenizerError, byte_to_unicode

    f = GGUFFile(path)
    name = f.path.name
    try:
        model = f.get("tokenizer.ggml.model", str)
        if model != "gpt2":
            raise GGUFError(f"{name}: tokenizer model {model!r} is not byte-level BPE (gpt2)")
        tokens = f.get("tokenizer.ggml.tokens", list)
        types = f.get("tokenizer.ggml.token_type", list)
        if tokens is None or tokens[0] != STRING:
            raise GGUFError(f"{name}: tokenizer.ggml.tokens must be an array of strings")
        tokens = tokens[1]
        if types is not None and (types[0] not in (4, 5) or len(types[1]) != len(tokens)):
            raise GGUFError(f"{name}: tokenizer.ggml.token_type must be int32 values, one per token")
        for key in ("bos", "eos", "eot", "eom", "padding", "unknown", "sep", "cls", "mask"):
            tid = f.get(f"tokenizer.ggml.{key}_token_id", int)
            if tid is not None and not 0 <= tid < len(tokens):
                raise GGUFError(f"{name}: tokenizer.ggml.{key}_token_id {tid} is outside the {len(tokens)}-token vocab")
        n_special = 256
        n_base = len(tokens) - n_special
        if n_base < 256:
            raise GGUFError(f"{name}: vocabulary of {len(tokens)} tokens is too small for Llama 3's layout")
        decode = {ch: b for b, ch in byte_to_unicode().items()}
        ranks = {}
        for i, text in enumerate(tokens[:n_base]):
            try:
                ranks[bytes(decode[ch] for ch in text)] = i
            except KeyError:
                raise GGUFError(f"{name}: token {i} {text[:40]!r} is not in the byte-level alphabet") from None
        try:
            return Tokenizer(ranks, tokens[n_base:])
        except TokenizerError as e:
            raise GGUFError(f"{name}: {e}") from None
    finally:
        f.close()


def render_chat_template(template: str, messages: list[dict], **context) -> str:
    """Render a (possibly hostile) GGUF chat template in jinja2's immutable sandbox."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=messages, **context)
    except TemplateError as e:
        raise GGUFError(f"chat template refused: {e}") from None
