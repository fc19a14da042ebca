"""Training checkpoints: sharded torch.distributed.checkpoint (DCP) folders that are either complete or ignored,
and the final export of a (sharded) model to the HF and Meta layouts. (herd.checkpoint reads and writes model
weights in the HF / Meta / GGUF layouts; this module saves and resumes whole training states.)

Layout of `<run_dir>/checkpoints/`:

    step-00000100/            a complete checkpoint (has COMPLETE)
      .metadata, __0_0.distcp ...   DCP: model and optimizer tensors, each rank writing its own shards
      train_state.json        step, tokens seen, data-loader position, settings of the run (JSON: no pickles)
      rng-00000.pt ...        each rank's torch RNG states (tensors only, read with weights_only=True)
      COMPLETE                written last, then the folder is renamed from step-00000100.partial
    step-00000200.partial/    a save in progress or one killed half-way: never loaded, removed on the next save

A save goes to `step-N.partial/`; after every rank has written, rank 0 writes the COMPLETE marker, fsyncs it and
renames the folder to `step-N/`, so a `kill -9` at any point leaves the previous checkpoint as the latest.
Old checkpoints beyond keep-last-k are renamed away before they are deleted, so a half-deleted one is never picked.

DCP's `.metadata` file is a pickle. Checkpoints are read back with an unpickler that admits only DCP's own metadata
classes, and only tensor entries are loaded (DCP would unpickle non-tensor entries with weights_only=False).
Resume folders are still meant to be your own runs; exported HF/Meta weights are the files to share.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as distcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint import save_hf, save_meta
from ..config import torch_dtype
from ..loading import make_readable, save_tokenizer
from ..tokenizer import write_tiktoken_bpe

MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointLoadError(ValueError):
    """A training checkpoint that is missing, incomplete or not one herd wrote."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized, assuming the intent")
        yield


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- finding checkpoints ------------------------------------------------------------------------------------


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first; anything without COMPLETE is skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def clean_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove partial saves and step folders that lack COMPLETE (rank 0 only; returns what was removed)."""
    folder = Path(folder)
    removed = []
    if _rank() != 0 or not folder.is_dir():
        return removed
    for p in folder.iterdir():
        stale = p.name.endswith(".partial") or p.name.endswith(".deleting") or (
            _STEP_DIR.match(p.name) and not (p / MARKER).is_file())
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ---- saving -------------------------------------------------------------------------------------------------


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _model_state(model, trainable_only: bool) -> dict:
    """The model's state dict; with `trainable_only`, just the parameters that train (no frozen base, no buffers
    such as a quantized base's): a LoRA checkpoint holds the adapters, the base comes from model.init_from."""
    if not trainable_only:
        return get_model_state_dict(model)
    sd = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    keep = _trainable_names(model)
    return {k: v for k, v in sd.items() if k in keep}


def _tensor_state(model, optimizer, trainable_only: bool = False) -> dict:
    """{"model": FQN -> tensor, "optim": FQN -> {step, exp_avg, exp_avg_sq}}: tensors only (DTensors when sharded).

    The optimizer's param_groups (lr, betas, ...) are not saved: they come from the run's settings on resume.
    """
    model_sd = _model_state(model, trainable_only)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd["state"]}
    for fqn, s in optim_sd["state"].items():
        for k, v in s.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{k} is a {type(v).__name__}, not a tensor")
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    folder: str | os.PathLike, step: int, model, optimizer, train_state: dict, *, keep: int | None = None,
    trainable_only: bool = False,
) -> Path:
    """Save a sharded checkpoint of `step` into `folder` (collective: every rank calls it). Returns its path.
    `trainable_only`: only parameters with requires_grad (and their optimizer state)."""
    folder = Path(folder)
    final = folder / f"step-{step:08d}"
    partial = folder / f"{final.name}.partial"
    rank = _rank()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(folder)
        partial.mkdir()
    _barrier()
    with _single_process_quiet():
        distcp.save(_tensor_state(model, optimizer, trainable_only), checkpoint_id=partial)
    torch.save(_rng_state(), partial / f"rng-{rank:05d}.pt")
    if rank == 0:
        _write_json(partial / TRAIN_STATE, {**train_state, "step": step, "world_size": _world()})
    _barrier()
    if rank == 0:
        _commit(partial, final, step)
        if keep:
            prune(folder, keep)
    _barrier()
    return final


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _commit(partial: Path, final: Path, step: int) -> None:
    """Write the COMPLETE marker last, then rename the folder into place (both made durable with fsync)."""
    for f in partial.iterdir():
        if f.is_file():
            _fsync_path(f)
    _write_json(partial / MARKER, {"step": step, "time": time.time()})
    if final.exists():  # a re-save of the same step (e.g. the final step after a resume)
        trash = final.with_name(final.name + ".deleting")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(partial, final)
    _fsync_path(final.parent)


def prune(folder: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (renamed to *.deleting first)."""
    removed = []
    for _, p in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        trash = p.with_name(p.name + ".deleting")
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(p)
    return removed


# ---- loading ------------------------------------------------------------------------------------------------

# Everything a DCP .metadata file written by herd (torch 2.x) may name; any other global is refused.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
} | {("torch", str(d).removeprefix("torch.")) for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise CheckpointLoadError(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds")
        return super().find_class(module, name)


class _SafeReader(FileSystemReader):
    """FileSystemReader whose .metadata is read by the allow-list unpickler, with tensor entries in plain files."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                md = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise CheckpointLoadError(f"{path}: unreadable DCP metadata ({e})") from None
        for key, entry in md.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise CheckpointLoadError(f"{path}: entry {key!r} is not a tensor")
        for info in (md.storage_data or {}).values():
            name = str(info.relative_path)
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise CheckpointLoadError(f"{path}: data file {name!r} is not a plain name inside the checkpoint")
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def load_checkpoint(path: str | os.PathLike, model, optimizer=None, *, trainable_only: bool = False) -> dict:
    """Load model (and optimizer) tensors and this rank's RNG state from a complete checkpoint; returns its
    train_state dict. Works across layouts: DCP reshards a checkpoint saved with other FSDP/TP sizes.
    `trainable_only`: the checkpoint holds (and must hold) exactly the parameters with requires_grad."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointLoadError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    try:
        train_state = json.loads((path / TRAIN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointLoadError(f"{path}: cannot read {TRAIN_STATE} ({e})") from None
    state = {"model": _model_state(model, trainable_only)}
    optim_sd = None
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer)  # initialises empty AdamW state to load into
        state["optim"] = optim_sd["state"]
    reader = _SafeReader(path)
    reader.read_metadata()  # refuse a hostile or foreign .metadata here, with its own message
    try:
        with _single_process_quiet():
            distcp.load(state, storage_reader=reader)
    except CheckpointException as e:
        detail = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
        raise CheckpointLoadError(f"{path}: cannot load ({detail[-1] if detail else e})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not trainable_only))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"], "param_groups": optim_sd["param_groups"]})
    rng_file = path / f"rng-{_rank():05d}.pt"
    if train_state.get("world_size") == _world() and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return train_state


def gather_full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """All-gather a sharded model's state dict to full CPU tensors on rank 0 (collective); None on other ranks."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if _rank() == 0 else None


# ---- the final export ---------------------------------------------------------------------------------------


def export_weights(model, out_dir: str | os.PathLike, formats: list[str], dtype: str = "bf16",
                   tokenizer: str | None = None) -> list[Path]:
    """Write the final weights as out_dir/hf and/or out_dir/meta with herd.checkpoint's writers (collective:
    the full state dict is gathered to rank 0, which writes). `tokenizer` is the run's data.tokenizer setting."""
    sd = gather_full_state_dict(model)
    if sd is None:
        return []
    args = model.args
    if args.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    writers = {"hf": save_hf, "meta": save_meta}
    out = [writers[f](sd, args, Path(out_dir) / f, dtype=torch_dtype(dtype), overwrite=True) for f in formats]
    for folder in out:
        export_tokenizer(tokenizer, folder)
    return out


def export_tokenizer(spec: str | None, folder: Path) -> None:
    """Put the run's tokenizer (its data.tokenizer setting: a file, a checkpoint folder, a .gguf model, "bytes")
    beside the weights so the exported model chats at once, and make the folder's files readable (0644 under
    umask 022; safetensors writes 0600). The Llama 3 vocabulary (Llama Materials, found in the llama-models package)
    is never copied: a folder without a tokenizer loads with it."""
    if spec == "bytes":
        write_tiktoken_bpe({bytes([b]): b for b in range(256)}, folder / "tokenizer.model")
    elif spec is not None:
        save_tokenizer(spec, folder)
    make_readable(folder)
