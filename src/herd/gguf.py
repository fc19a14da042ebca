"""GGUF interop: write llama.cpp/Ollama files (F32/F16/BF16/Q8_0/Q4_0) and read GGUF back, bounds-checked.

Writing uses the `gguf` package's GGUFWriter for the container; the Q8_0 and Q4_0 blocks are made here in torch
and match ggml's reference quantizers bit for bit (tests compare with `gguf.quants`). GGUF keeps Meta's
interleaved q/k row order (llama.cpp's "normal" RoPE), so herd's state dict goes in without a permutation.

Reading is herd's own parser: every count, length, dimension, offset and alignment is checked against the bytes
that remain before anything is allocated, and every failure is a GGUFError (never `assert`, which `python -O`
removes). A chat template found in a file is only ever rendered in jinja2's immutable sandbox.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, check_state_dict
from .config import ConfigError, ModelArgs, ffn_fields
from .model import rope_frequencies
from .tokenizer import byte_to_unicode


class GGUFError(CheckpointError):
    """A GGUF file that is malformed, hostile, or not a Llama model herd can load."""


# ---- ggml tensor types: (block size in elements, bytes per block) ------------------------------------------
F32, F16, Q4_0, Q8_0, BF16 = 0, 1, 2, 8, 30
GGML_TYPES = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34), BF16: (1, 2)}
GGML_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q8_0: "Q8_0", BF16: "BF16"}
OUT_TYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0}
FILE_TYPES = {F32: 0, F16: 1, Q4_0: 2, Q8_0: 7, BF16: 32}  # llama_ftype "mostly X"

# Limits for the reader (llama.cpp fixed the same classes of bugs: see reliability-checklist §1b).
MAX_DIMS = 4
MAX_KEY_BYTES = 1 << 16
MAX_STRING_BYTES = 1 << 24  # a chat template is ~10 KB; a 1 GiB string is an attack
MAX_ALIGNMENT = 1 << 16
MAX_NESTING = 1
GGUF_VERSIONS = (2, 3)

# ---- the tensor-name map: Meta names <-> llama.cpp names -------------------------------------------------------
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
}
GGUF_TO_META = {v: k for k, v in META_TO_GGUF.items()}


def _translate(key: str, mapping: dict[str, str], prefix: str) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == prefix and parts[1].isdigit():
        template = ".".join([prefix, "{}", *parts[2:]])
        if template in mapping:
            return mapping[template].format(parts[1])
    elif key in mapping:
        return mapping[key]
    raise GGUFError(f"unexpected tensor {key!r}")


# ---- Q8_0 / Q4_0 blocks in torch ------------------------------------------------------------------------------


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """(rows, cols) -> uint8 (rows, cols/32*34): per 32 values an f16 scale amax/127 and 32 int8."""
    blocks = w.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(blocks * inv).to(torch.int8)
    out = torch.cat([d.half().view(torch.uint8), q.view(torch.uint8)], dim=1)
    return out.reshape(w.shape[0], -1).numpy()


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """(rows, cols) -> uint8 (rows, cols/32*18): f16 scale max/-8 and 32 4-bit values, low nibbles first half."""
    blocks = w.float().reshape(-1, 32)
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(blocks * inv + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    out = torch.cat([d.half().view(torch.uint8), packed], dim=1)
    return out.reshape(w.shape[0], -1).numpy()


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw tensor bytes of one GGUF tensor -> float tensor of `shape` (torch order)."""
    data = torch.from_numpy(raw)
    if ggml_type == F32:
        return data.view(torch.float32).reshape(shape)
    if ggml_type == F16:
        return data.view(torch.float16).reshape(shape)
    if ggml_type == BF16:
        return data.view(torch.bfloat16).reshape(shape)
    bsize = GGML_TYPES[ggml_type][1]
    blocks = data.reshape(-1, bsize)
    d = blocks[:, :2].contiguous().view(torch.float16).float()
    if ggml_type == Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
    else:  # Q4_0
        packed = blocks[:, 2:].to(torch.int16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float() - 8
    return (q * d).reshape(shape)


# ---- writing ------------------------------------------------------------------------------------------------


def rope_factors(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's rope_freqs.weight: per-dimension divisors of the base frequencies (1 = unscaled)."""
    base = rope_frequencies(args.replace(use_scaled_rope=False))
    return base / rope_frequencies(args)


def write_gguf(
    sd: dict[str, torch.Tensor],
    args: ModelArgs,
    tokenizer,
    out: str | os.PathLike,
    *,
    dtype: str = "f16",
    name: str = "herd",
    chat_template: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a llama.cpp-compatible GGUF of a Meta-named state dict, with tokenizer and chat template."""
    import gguf as gg

    if dtype not in OUT_TYPES:
        raise GGUFError(f"unknown GGUF dtype {dtype!r} ({', '.join(OUT_TYPES)})")
    if tokenizer.n_words != args.vocab_size:
        raise GGUFError(f"tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is {args.vocab_size}")
    check_state_dict(sd, args, "state dict")
    want = OUT_TYPES[dtype]
    plan = []  # (gguf name, tensor, ggml type)
    for k, v in sd.items():
        if args.tie_embeddings and k == "output.weight":
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        t = F32 if v.dim() == 1 else want
        if t in (Q8_0, Q4_0) and v.shape[-1] % 32:
            t = F16  # quantized blocks need rows divisible by 32
        plan.append((_translate(k, META_TO_GGUF, "layers"), v, t))
    if args.use_scaled_rope:
        plan.append(("rope_freqs.weight", rope_factors(args), F32))

    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gg.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[want])
        for key, value in _model_metadata(args).items():
            _add_kv(writer, key, value)
        for key, value in tokenizer_metadata(tokenizer).items():
            _add_kv(writer, key, value)
        if chat_template:
            writer.add_chat_template(chat_template)
        for gname, v, t in plan:
            rows = v.shape[0] if v.dim() == 2 else 1
            nbytes = v.numel() // GGML_TYPES[t][0] * GGML_TYPES[t][1]
            np_dtype = {F32: np.float32, F16: np.float16}.get(t, np.uint8)
            shape = tuple(v.shape) if t in (F32, F16) else (rows, nbytes // rows)
            writer.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, raw_dtype=gg.GGMLQuantizationType(t))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, v, t in tqdm(plan, desc=f"write gguf {dtype}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_encode(v, t))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def tokenizer_metadata(tokenizer) -> dict[str, Any]:
    """GGUF tokenizer keys for a herd Tokenizer (byte-level BPE, llama.cpp's "gpt2" model, "llama-bpe" split)."""
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


def _encode(v: torch.Tensor, t: int) -> np.ndarray:
    if t == F32:
        return v.detach().float().contiguous().numpy()
    if t == F16:
        return v.detach().half().contiguous().numpy()
    if t == BF16:
        return v.detach().bfloat16().contiguous().view(torch.uint16).numpy()
    return quantize_q8_0(v.detach()) if t == Q8_0 else quantize_q4_0(v.detach())


def _model_metadata(args: ModelArgs) -> dict[str, Any]:
    meta = {
        "llama.vocab_size": args.vocab_size,
        "llama.context_length": args.max_seq_len,
        "llama.embedding_length": args.dim,
        "llama.block_count": args.n_layers,
        "llama.feed_forward_length": args.ffn_hidden_dim,
        "llama.rope.dimension_count": args.head_dim,
        "llama.attention.head_count": args.n_heads,
        "llama.attention.head_count_kv": args.n_kv_heads,
        "llama.attention.key_length": args.head_dim,
        "llama.attention.value_length": args.head_dim,
        "llama.attention.layer_norm_rms_epsilon": float(args.norm_eps),
        "llama.rope.freq_base": float(args.rope_theta),
    }
    if args.use_scaled_rope:  # exact constants for herd; llama.cpp itself uses rope_freqs.weight
        meta.update({
            "herd.rope.scale_factor": float(args.rope_scale_factor),
            "herd.rope.low_freq_factor": float(args.rope_low_freq_factor),
            "herd.rope.high_freq_factor": float(args.rope_high_freq_factor),
            "herd.rope.original_context_length": int(args.rope_original_max_seq_len),
        })
    return meta


def _add_kv(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))  # ints -> INT32, strings -> STRING


# ---- reading: a bounds-checked parser ---------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF stores ne[] fastest-first: reversed)
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise GGUFError(f"{self.path.name}: truncated or oversized {what} ({n} bytes at offset {self.pos}, "
                            f"{self.end - self.pos} left)")
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.scalar("<Q", f"{what} length")
        if n > limit:
            raise GGUFError(f"{self.path.name}: {what} is {n} bytes, over the {limit}-byte limit")
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path.name}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype == 6:  # float32: back to the shortest decimal (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(self.scalar("<f", f"value of {key}"))))
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"value of {key}")
        if vtype == STRING:
            return self.string(f"value of {key}")
        if vtype != ARRAY:
            raise GGUFError(f"{self.path.name}: {key} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            raise GGUFError(f"{self.path.name}: {key} nests arrays, which herd does not accept")
        etype = self.scalar("<I", f"element type of {key}")
        count = self.scalar("<Q", f"element count of {key}")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            raw = self.take(count * size, f"array {key}")  # bounds-checked before any allocation
            arr = np.frombuffer(raw, dtype=_NP_SCALARS[etype]).copy()
            return (etype, arr.astype(bool) if etype == 7 else arr)
        if etype == STRING:
            if count * 8 > self.end - self.pos:  # each string needs at least its 8-byte length
                raise GGUFError(f"{self.path.name}: {key} claims {count} strings, more than the file can hold")
            return (etype, [self.string(f"element of {key}", 1 << 16) for _ in range(count)])
        if etype == ARRAY:
            raise GGUFError(f"{self.path.name}: {key} nests arrays, which herd does not accept")
        raise GGUFError(f"{self.path.name}: {key} has unknown element type {etype}")


class GGUFFile:
    """A parsed, validated GGUF file: metadata dict, tensor infos, and lazy access to tensor bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
            size = os.fstat(self._fh.fileno()).st_size
            # copy-on-write: tensors are zero-copy views, and writing to them (training) never touches the file
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot open ({e})") from None
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(_Cursor(self._mm, self.path))

    def _parse(self, c: _Cursor) -> None:
        name = self.path.name
        if bytes(c.take(4, "magic")) != b"GGUF":
            raise GGUFError(f"{name}: not a GGUF file (bad magic)")
        version = c.scalar("<I", "version")
        if version not in GGUF_VERSIONS:
            raise GGUFError(f"{name}: unsupported GGUF version {version}")
        n_tensors = c.scalar("<Q", "tensor count")
        n_kv = c.scalar("<Q", "metadata count")
        # the smallest kv is 8 (key length) + 1 + 4 (type) + 1 bytes; the smallest tensor info 8 + 1 + 4 + 8 + 4 + 8
        if n_kv * 14 > c.end - c.pos or n_tensors * 33 > c.end - c.pos:
            raise GGUFError(f"{name}: claims {n_kv} metadata entries and {n_tensors} tensors, more than the file holds")
        for _ in range(n_kv):
            key = c.string("metadata key", MAX_KEY_BYTES)
            if key in self.metadata:
                raise GGUFError(f"{name}: duplicate metadata key {key!r}")
            self.metadata[key] = c.value(c.scalar("<I", f"type of {key}"), key)
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, (int, np.integer)) or isinstance(align, bool) or align <= 0 \
                or align & (align - 1) or align > MAX_ALIGNMENT:
            raise GGUFError(f"{name}: general.alignment {align!r} must be a power of two up to {MAX_ALIGNMENT}")
        infos = []
        for _ in range(n_tensors):
            tname = c.string("tensor name", 1024)
            if tname in self.tensors or any(t.name == tname for t in infos):
                raise GGUFError(f"{name}: duplicate tensor name {tname!r}")
            n_dims = c.scalar("<I", f"dims of {tname}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{name}: tensor {tname!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            ne = [c.scalar("<Q", f"shape of {tname}") for _ in range(n_dims)]
            gtype = c.scalar("<I", f"type of {tname}")
            offset = c.scalar("<Q", f"offset of {tname}")
            if gtype not in GGML_TYPES:
                raise GGUFError(f"{name}: tensor {tname!r} has ggml type {gtype}, which herd cannot read "
                                f"(supported: {', '.join(GGML_NAMES.values())})")
            if any(d <= 0 or d > 1 << 40 for d in ne):
                raise GGUFError(f"{name}: tensor {tname!r} has a bad shape {ne}")
            numel = int(np.prod(ne, dtype=object))
            block, bsize = GGML_TYPES[gtype]
            if ne[0] % block:
                raise GGUFError(f"{name}: tensor {tname!r} row of {ne[0]} is not a multiple of the block size {block}")
            if offset % align:
                raise GGUFError(f"{name}: tensor {tname!r} offset {offset} is not aligned to {align}")
            infos.append(TensorInfo(tname, tuple(reversed(ne)), gtype, offset, numel // block * bsize))
        self.data_start = -(-c.pos // align) * align
        data_size = c.end - self.data_start
        last_end = 0
        for t in sorted(infos, key=lambda t: t.offset):
            if t.offset < last_end:
                raise GGUFError(f"{name}: tensor {t.name!r} overlaps the previous tensor")
            if t.offset + t.nbytes > data_size:
                raise GGUFError(f"{name}: tensor {t.name!r} runs past the end of the file")
            last_end = t.offset + t.nbytes
        self.tensors = {t.name: t for t in infos}

    def raw(self, tname: str) -> np.ndarray:
        t = self.tensors[tname]
        start = self.data_start + t.offset
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=start)

    def tensor(self, tname: str) -> torch.Tensor:
        t = self.tensors[tname]
        return dequantize(self.raw(tname), t.ggml_type, t.shape)

    def get(self, key: str, kind: type | tuple = (int, float, str, bool), default=None):
        if key not in self.metadata:
            return default
        v = self.metadata[key]
        if isinstance(v, tuple):  # arrays are (element type, values)
            if kind is not list:
                raise GGUFError(f"{self.path.name}: {key} is an array, expected a single value")
            return v
        if isinstance(v, np.generic):
            v = v.item()
        if not isinstance(v, kind):
            raise GGUFError(f"{self.path.name}: {key} has the wrong type ({type(v).__name__})")
        return v

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._fh.close()


def _config(f: GGUFFile) -> ModelArgs:
    name = f.path.name
    arch = f.get("general.architecture", str)
    if arch != "llama":
        raise GGUFError(f"{name}: architecture {arch!r} is not llama")

    def need(key, kind=int):
        v = f.get(f"llama.{key}", kind)
        if v is None:
            raise GGUFError(f"{name}: missing llama.{key}")
        return v

    dim, n_heads = need("embedding_length"), need("attention.head_count")
    emb = f.tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{name}: missing tensor token_embd.weight")
    vocab = f.get("llama.vocab_size", int) or emb.shape[0]
    try:
        args = ModelArgs(
            dim=dim, n_layers=need("block_count"), n_heads=n_heads,
            n_kv_heads=f.get("llama.attention.head_count_kv", int) or n_heads, vocab_size=vocab,
            norm_eps=need("attention.layer_norm_rms_epsilon", float),
            rope_theta=float(f.get("llama.rope.freq_base", (int, float)) or 10000.0),
            max_seq_len=f.get("llama.context_length", int) or 131072,
            tie_embeddings="output.weight" not in f.tensors,
            **ffn_fields(dim, need("feed_forward_length")),
        )
    except ConfigError as e:
        raise GGUFError(f"{name}: {e}") from None
    rot = f.get("llama.rope.dimension_count", int)
    if rot not in (None, args.head_dim):
        raise GGUFError(f"{name}: partial rotary embeddings (rope.dimension_count {rot}) are not Llama 3")
    if "rope_freqs.weight" in f.tensors:
        args = _rope_from_factors(f, args)
    return args


def _rope_from_factors(f: GGUFFile, args: ModelArgs) -> ModelArgs:
    """Recover llama3 rope-scaling constants: herd's own keys if present, else the published combinations."""
    got = f.tensor("rope_freqs.weight").float()
    if got.shape != (args.head_dim // 2,):
        raise GGUFError(f"{f.path.name}: rope_freqs.weight has shape {tuple(got.shape)}")
    candidates = []
    if f.get("herd.rope.scale_factor", float) is not None:
        candidates.append(dict(
            rope_scale_factor=f.get("herd.rope.scale_factor", float),
            rope_low_freq_factor=f.get("herd.rope.low_freq_factor", float),
            rope_high_freq_factor=f.get("herd.rope.high_freq_factor", float),
            rope_original_max_seq_len=f.get("herd.rope.original_context_length", int),
        ))
    candidates += [dict(rope_scale_factor=s, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=8192) for s in (8.0, 32.0, 16.0, 4.0, 2.0, 64.0)]
    for cand in candidates:
        try:
            trial = args.replace(use_scaled_rope=True, **cand)
        except ConfigError as e:  # herd.rope.* keys out of range (ModelArgs checks them like any config)
            raise GGUFError(f"{f.path.name}: {e}") from None
        if torch.allclose(rope_factors(trial), got, rtol=1e-5, atol=0):
            return trial
    raise GGUFError(f"{f.path.name}: rope_freqs.weight does not match a llama3 rope scaling herd knows")


def _state_dict(f: GGUFFile, args: ModelArgs) -> dict[str, torch.Tensor]:
    sd = {}
    for tname in f.tensors:
        if tname == "rope_freqs.weight":
            continue
        sd[_translate(tname, GGUF_TO_META, "blk")] = f.tensor(tname)
    if args.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def read_gguf_config(path: str | os.PathLike) -> ModelArgs:
    f = GGUFFile(path)
    try:
        return _config(f)
    finally:
        f.close()


def read_gguf(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and Meta-named state dict of a GGUF file; quantized tensors are dequantized to float32."""
    f = GGUFFile(path)
    args = _config(f)
    sd = _state_dict(f, args)
    check_state_dict(sd, args, str(path))
    return args, sd


__all__ = ["GGUFError", "GGUFFile", "write_gguf", "read_gguf", "read_gguf_config", "quantize_q8_0", "quantize_q4_0",
           "dequantize", "tokenizer_metadata", "merges_from_ranks"]
# reading vocabularies and rendering chat templates: gguf_vocab.py; a checkpoint to GGUF: herd.convert
