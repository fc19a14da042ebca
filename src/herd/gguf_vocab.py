"""What a GGUF file's keys mean to herd beyond the weights: a checked herd Tokenizer from its byte-level BPE
vocabulary, and sandboxed rendering of its chat template. The file format itself (reader, writer with the
vocabulary keys it writes, tensor types) is gguf.py.
"""

from __future__ import annotations

import os

from .gguf import STRING, GGUFError, GGUFFile
from .tokenizer import Tokenizer, TokenizerError, byte_to_unicode


def read_gguf_tokenizer(path: str | os.PathLike):
    """A herd Tokenizer from the file's byte-level BPE vocabulary, with every id checked against the vocab size."""
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
