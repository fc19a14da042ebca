"""Checkpoint I/O in both directions for the two folder layouts: Hugging Face safetensors and Meta
consolidated.NN.pth (GGUF files: herd.gguf; opening any format: herd.loading).

Inside herd a state dict always uses Meta's names (the names of model.py). One key map (`META_TO_HF`) and one
q/k row permutation (`permute_qk`) translate to and from the HF layout; both directions and the tests use them.
Reading is lazy: safetensors and .pth files are memory-mapped and tensors are only touched when used. Writing is
atomic: files go to a hidden sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from .config import MAX_CONFIG_BYTES, ConfigError, JSONError, ModelArgs, load_params, read_json
from .model import Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its config; the message names the file or key."""


# ---- the one key map and the one permutation -----------------------------------------------------------------

META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
HF_TO_META = {v: k for k, v in META_TO_HF.items()}
_LAYER = re.compile(r"(?<=layers\.)(\d+)(?=\.)")

# Model-parallel split dims in Meta's consolidated.NN.pth shards (fairscale Column/Row/VocabParallel layers).
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")  # split on dim 0
ROW_PARALLEL = ("wo", "w2")  # split on dim 1
# Buffers some writers leave in checkpoints; they carry no weights and are dropped on read.
IGNORED_KEYS = re.compile(r"(^rope\.freqs$|rotary_emb\.inv_freq$)")


def permute_qk(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Reorder wq/wk rows between Meta's interleaved RoPE pairs and HF's rotate_half halves.

    Meta -> HF (inverse=False): within each head, rows (0, 1, 2, 3, ...) become (0, 2, 4, ..., 1, 3, 5, ...).
    HF -> Meta (inverse=True) undoes it. w: (n_heads * head_dim, dim).
    """
    rows, cols = w.shape
    hd = rows // n_heads
    shape = (n_heads, 2, hd // 2, cols) if inverse else (n_heads, hd // 2, 2, cols)
    return w.reshape(shape).transpose(1, 2).reshape(rows, cols)


def translate_key(key: str, mapping: dict[str, str]) -> str:
    m = _LAYER.search(key)
    template = _LAYER.sub("{}", key, count=1) if m else key
    if template not in mapping:
        raise CheckpointError(f"unexpected tensor {key!r}")
    return mapping[template].format(m.group(1)) if m else mapping[template]


def _qk_heads(meta_key: str, args: ModelArgs) -> int | None:
    if meta_key.endswith("attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def meta_to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if args.tie_embeddings and k == "output.weight":
            continue  # HF stores the tied head once, as embed_tokens
        heads = _qk_heads(k, args)
        out[translate_key(k, META_TO_HF)] = permute_qk(v, heads) if heads else v
    return out


def hf_to_meta(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if IGNORED_KEYS.search(k):
            continue
        mk = translate_key(k, HF_TO_META)
        heads = _qk_heads(mk, args)
        out[mk] = permute_qk(v, heads, inverse=True) if heads else v
    return out


# ---- validation ---------------------------------------------------------------------------------------------


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Transformer(args).state_dict()'s keys (in its order) and shapes, computed from the config without building
    the model (a test compares the two), so checking a checkpoint costs nothing whatever its config claims."""
    d, hd, hidden = args.dim, args.head_dim, args.ffn_hidden_dim
    layer = {
        "attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
        "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
        "feed_forward.w1.weight": (hidden, d), "feed_forward.w2.weight": (d, hidden),
        "feed_forward.w3.weight": (hidden, d), "attention_norm.weight": (d,), "ffn_norm.weight": (d,),
    }
    out = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        out.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    out["norm.weight"] = (d,)
    out["output.weight"] = (args.vocab_size, d)
    return out


def check_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, source: str = "checkpoint") -> None:
    """Strict key and shape check against the config; the error names the first offending key."""
    want = expected_shapes(args)
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(sd[k].shape)}, config expects {shape}")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{source}: {k} has dtype {sd[k].dtype}, expected a floating point tensor")


def _untie(sd: dict[str, torch.Tensor], args: ModelArgs, source: str) -> dict[str, torch.Tensor]:
    """Make the state dict hold output.weight for tied configs, checking that a stored copy really is tied."""
    if not args.tie_embeddings or "tok_embeddings.weight" not in sd:
        return sd
    emb = sd["tok_embeddings.weight"]
    if "output.weight" in sd and sd["output.weight"] is not emb and not torch.equal(sd["output.weight"], emb):
        raise CheckpointError(f"{source}: output.weight differs from tok_embeddings.weight but the config is tied")
    return {**sd, "output.weight": emb}


# ---- reading ------------------------------------------------------------------------------------------------


def detect_format(path: str | os.PathLike) -> str:
    """'hf', 'meta' or 'gguf' for a path on disk; raises CheckpointError otherwise."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        if p.name in ("config.json", "params.json"):
            return detect_format(p.parent)
        raise CheckpointError(f"{p}: expected a checkpoint folder (HF or Meta) or a .gguf file")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a file or folder")
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()):
        return "hf"
    if (p / "params.json").is_file() and any(p.glob("consolidated.*.pth")):
        return "meta"
    if (p / "original" / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{p}: neither an HF folder (config.json + *.safetensors) nor a Meta folder (params.json + consolidated.*.pth)")


def _inside(folder: Path, name: str) -> Path:
    """A shard name from an index file, refused unless it is a plain file name inside `folder`."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{folder}: index names an invalid shard file {name!r}")
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise CheckpointError(f"{folder}: shard {name!r} escapes the checkpoint folder")
    return path


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise CheckpointError(f"duplicate key {k!r} in index file")
        d[k] = v
    return d


def _hf_shards(folder: Path) -> dict[Path, list[str] | None]:
    """Shard file -> tensor names it must hold (None: whatever a single model.safetensors holds)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            data = read_json(index, max_bytes=MAX_CONFIG_BYTES, object_pairs_hook=_no_duplicates)
        except JSONError as e:
            raise CheckpointError(f"{e} (a malformed index)") from None
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read the index ({e})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: malformed index (no weight_map object)")
        shards: dict[Path, list[str]] = {}
        for tensor, name in weight_map.items():
            shards.setdefault(_inside(folder, name), []).append(tensor)
        for path in shards:
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {path.name} is missing")
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{folder}: {len(files)} .safetensors files and no model.safetensors.index.json")
    return {files[0]: None}


def _open_safetensors(path: Path, stack: ExitStack):
    from safetensors import safe_open

    try:
        return stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError for bad headers
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def read_hf(folder: str | os.PathLike, stack: ExitStack) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and lazily mapped tensors (HF names) of an HF folder; files stay open while `stack` is."""
    folder = Path(folder)
    args = load_params(folder / "config.json")
    tensors: dict[str, torch.Tensor] = {}
    for path, names in _hf_shards(folder).items():
        f = _open_safetensors(path, stack)
        keys = list(f.keys())
        if names is not None and set(names) - set(keys):
            raise CheckpointError(f"{path.name}: index lists {sorted(set(names) - set(keys))[0]!r}, not in the file")
        for k in keys:
            if names is not None and k not in names:
                raise CheckpointError(f"{path.name}: holds {k!r}, which the index assigns elsewhere or not at all")
            if k in tensors:
                raise CheckpointError(f"{path.name}: tensor {k!r} appears in two shards")
            try:
                tensors[k] = f.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{path.name}: cannot read {k!r} ({e})") from None
    return args, tensors


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.save zip archive (truncated, or not a .pth checkpoint)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle (weights_only=True): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return sd


def meta_shards(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.*.pth files")
    for i, f in enumerate(files):
        if f.name != f"consolidated.{i:02d}.pth":
            raise CheckpointError(f"{folder}: model-parallel shards must be consolidated.00.pth ... ; found {f.name}")
    return files


def _split_dim(key: str) -> int | None:
    name = key.split(".")[-2]
    return 0 if name in COLUMN_PARALLEL else 1 if name in ROW_PARALLEL else None


def read_meta(folder: str | os.PathLike) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and Meta-named tensors of a Meta folder, merging model-parallel shards of any size."""
    folder = Path(folder)
    if not (folder / "params.json").exists() and (folder / "original" / "params.json").exists():
        folder = folder / "original"  # an HF hub download carries Meta's files under original/
    args = load_params(folder / "params.json")
    shards = [_torch_load(f) for f in meta_shards(folder)]
    if len(shards) == 1:
        return args, {k: v for k, v in shards[0].items() if not IGNORED_KEYS.search(k)}
    keys = list(shards[0])
    sd = {}
    for i, shard in enumerate(shards[1:], 1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))[0]
            raise CheckpointError(f"consolidated.{i:02d}.pth: key {diff!r} differs from consolidated.00.pth")
    for k in keys:
        if IGNORED_KEYS.search(k):
            continue
        parts = [s[k] for s in shards]
        dim = _split_dim(k)
        if dim is None:  # replicated norms must agree across ranks
            if any(not torch.equal(parts[0], p) for p in parts[1:]):
                raise CheckpointError(f"replicated tensor {k!r} differs between shards")
            sd[k] = parts[0]
        else:
            try:
                sd[k] = torch.cat(parts, dim=dim)
            except RuntimeError as e:
                raise CheckpointError(f"cannot merge {k!r} across shards: {e}") from None
    return args, sd


def read_folder(path: str | os.PathLike, stack: ExitStack) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and validated Meta-named state dict of an HF or Meta folder (lazy: memory-mapped tensors).
    herd.loading.read_checkpoint opens every format (GGUF too)."""
    fmt = detect_format(path)
    if fmt == "hf":
        args, hf_sd = read_hf(path, stack)
        sd = _untie(hf_to_meta(hf_sd, args), args, str(path))
    elif fmt == "meta":
        args, sd = read_meta(path)
        sd = _untie(sd, args, str(path))
    else:
        raise CheckpointError(f"{path}: a {fmt} file, not an HF or Meta folder")
    check_state_dict(sd, args, str(path))
    return args, sd


def folder_config(path: str | os.PathLike) -> ModelArgs:
    """The config of an HF or Meta folder, without reading weights."""
    p = Path(path)
    if detect_format(p) == "hf":
        return load_params(p / "config.json")
    return load_params((p if (p / "params.json").exists() else p / "original") / "params.json")


# ---- writing ------------------------------------------------------------------------------------------------


class AtomicDir:
    """Write into a hidden sibling folder; rename it to `final` only when everything is written."""

    def __init__(self, final: str | os.PathLike, overwrite: bool = False):
        self.final = Path(final)
        if self.final.exists() and not (self.final.is_dir() and (overwrite or not any(self.final.iterdir()))):
            raise CheckpointError(f"{self.final}: already exists and is not an empty folder")
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for f in self.tmp.rglob("*"):  # 0644 / 0755 like config.json, whatever mode a writer used (safetensors: 0600)
            f.chmod(0o755 if f.is_dir() else 0o644)
        self.tmp.chmod(0o755)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return False


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def _dtype_name(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> str:
    d = dtype or next(iter(sd.values())).dtype
    return str(d).removeprefix("torch.")


def save_hf(
    sd: dict[str, torch.Tensor] | Transformer,
    args: ModelArgs | None,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write an HF folder (config.json + model.safetensors, or shards + model.safetensors.index.json)."""
    from safetensors.torch import save_file

    if isinstance(sd, Transformer):
        args, sd = sd.args, sd.state_dict()
    check_state_dict(sd, args, "state dict")
    hf = meta_to_hf(sd, args)
    # Greedy sharding in key order; a tensor is cast only while its shard is written.
    shards: list[list[str]] = [[]]
    size = 0
    itemsize = dtype.itemsize if dtype is not None else None
    for k, v in hf.items():
        n = v.numel() * (itemsize or v.element_size())
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    with AtomicDir(out, overwrite) as tmp:
        _write_json(tmp / "config.json", args.to_hf(_dtype_name(sd, dtype)))
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        weight_map, total = {}, 0
        bar = tqdm(total=len(hf), desc="write hf", unit="tensor", disable=not progress)
        for name, keys in zip(names, shards):
            tensors = {k: _cast(hf[k], dtype).contiguous() for k in keys}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            for k in keys:
                weight_map[k] = name
                total += tensors[k].numel() * tensors[k].element_size()
            bar.update(len(keys))
            del tensors
        bar.close()
        if len(shards) > 1:
            _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return Path(out)


def shard_meta(sd: dict[str, torch.Tensor], args: ModelArgs, mp: int) -> tuple[ModelArgs, list[dict[str, torch.Tensor]]]:
    """Split a merged state dict into `mp` model-parallel ranks (KV heads repeated when mp > n_kv_heads)."""
    if mp < 1:
        raise CheckpointError(f"model-parallel size must be >= 1, got {mp}")
    if args.n_kv_heads % mp and mp % args.n_kv_heads:
        raise CheckpointError(f"n_kv_heads {args.n_kv_heads} cannot be split over {mp} ranks")
    rep = max(1, mp // args.n_kv_heads)
    if rep > 1:  # each rank needs whole KV heads: repeat each head `rep` times (llama-models reshard rule)
        hd = args.head_dim
        sd = dict(sd)
        for k in [k for k in sd if k.endswith(("attention.wk.weight", "attention.wv.weight"))]:
            w = sd[k]
            sd[k] = w.view(args.n_kv_heads, 1, hd, -1).expand(-1, rep, -1, -1).reshape(-1, w.shape[1])
        args = args.replace(n_kv_heads=args.n_kv_heads * rep)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for k, v in sd.items():
        dim = _split_dim(k)
        if dim is not None and v.shape[dim] % mp:
            raise CheckpointError(f"{k} with shape {tuple(v.shape)} does not split evenly over {mp} ranks")
        parts = v.chunk(mp, dim=dim) if dim is not None else [v] * mp
        for r in range(mp):
            ranks[r][k] = parts[r]
    return args, ranks


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage: copy views (MP chunks), keep whole (e.g. memory-mapped) tensors."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    return t if whole else t.clone()


def save_meta(
    sd: dict[str, torch.Tensor] | Transformer,
    args: ModelArgs | None,
    out: str | os.PathLike,
    *,
    mp: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a Meta folder: params.json + consolidated.NN.pth for `mp` model-parallel ranks."""
    if isinstance(sd, Transformer):
        args, sd = sd.args, sd.state_dict()
    check_state_dict(sd, args, "state dict")
    out_args, ranks = shard_meta(sd, args, mp)
    with AtomicDir(out, overwrite) as tmp:
        _write_json(tmp / "params.json", out_args.to_params())
        for r, rank_sd in enumerate(tqdm(ranks, desc="write meta", unit="shard", disable=not progress)):
            torch.save({k: _own_storage(_cast(v, dtype)) for k, v in rank_sd.items()}, tmp / f"consolidated.{r:02d}.pth")
    return Path(out)


def verify_checklist(folder: str | os.PathLike, progress: bool = False) -> int:
    """Check Meta's checklist.chk (md5sum lines) when present; returns the number of files verified."""
    folder = Path(folder)
    chk = folder / "checklist.chk"
    if not chk.exists():
        return 0
    n = 0
    for line in chk.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        digest, _, name = line.strip().partition("  ")
        path = _inside(folder, name.strip())
        if not path.exists():
            continue  # checklists also list files herd does not read (e.g. tokenizer.model for other tools)
        h = hashlib.md5()
        with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"md5 {name}", disable=not progress) as bar:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
                bar.update(len(block))
        if h.hexdigest() != digest.lower():
            raise CheckpointError(f"{path}: md5 {h.hexdigest()} does not match checklist.chk ({digest})")
        n += 1
    return n


__all__ = [
    "CheckpointError", "ConfigError", "META_TO_HF", "permute_qk", "meta_to_hf", "hf_to_meta", "check_state_dict",
    "detect_format", "read_folder", "folder_config", "read_hf", "read_meta", "save_hf", "save_meta", "shard_meta",
    "verify_checklist", "AtomicDir",
]
