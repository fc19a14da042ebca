"""Peak memory of loading and converting a checkpoint, as a multiple of its size on disk.

Builds a random bf16 checkpoint of a published shape (default: Llama-3.2-1B, 2.47 GB), then runs each job in a
fresh child process and reads the child's peak RSS (VmHWM). The child's RSS just after `import torch,
transformers, herd` is reported too, so the table shows both the raw peak and the part due to the weights.
The peer is transformers' `LlamaForCausalLM.from_pretrained` on the same HF folder, in the same run.

    python benchmarks/checkpoint_memory.py [--config llama-3.2-1b] [--workdir /tmp/herd-ckpt-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch, transformers
from herd.convert import convert
from herd.loading import load_model
torch.set_num_threads(2)
job, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]

def hwm():  # peak RSS of this process image (VmHWM; ru_maxrss would include the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
t0 = time.perf_counter()
tokens = torch.arange(8)[None]
if job == "herd-load":
    model = load_model(src)
    with torch.no_grad():
        model(tokens)  # touches every weight
elif job == "hf-load":
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        model(tokens)
elif job.startswith("convert-"):
    convert(src, dst, to=job.split("-")[1], verify=False)
peak = hwm()
print(json.dumps({"base": base, "peak": peak, "seconds": time.perf_counter() - t0}))
"""


def make_checkpoint(name: str, workdir: Path) -> tuple[Path, Path]:
    import torch

    from herd.checkpoint import save_hf, save_meta
    from herd.config import get_config
    from herd.model import Transformer

    hf, meta = workdir / "hf", workdir / "meta"
    if hf.exists() and meta.exists():
        return hf, meta
    shutil.rmtree(workdir, ignore_errors=True)
    args = get_config(name)
    with torch.device("meta"):
        model = Transformer(args)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    save_hf(sd, args, hf)
    save_meta(sd, args, meta)
    return hf, meta


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".pth"))


def run(job: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD, job, str(src), str(dst)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    shutil.rmtree(dst, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-3.2-1b")
    ap.add_argument("--workdir", default="/tmp/herd-ckpt-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    a = ap.parse_args()
    workdir = Path(a.workdir)
    t0 = time.perf_counter()
    hf, meta = make_checkpoint(a.config, workdir)
    print(f"checkpoint {a.config} bf16: HF {folder_bytes(hf) / 1e9:.2f} GB, Meta {folder_bytes(meta) / 1e9:.2f} GB "
          f"(built in {time.perf_counter() - t0:.0f} s)")
    jobs = [
        ("herd load HF + forward", "herd-load", hf),
        ("herd load Meta + forward", "herd-load", meta),
        ("herd convert HF -> Meta", "convert-meta", hf),
        ("herd convert Meta -> HF", "convert-hf", meta),
        ("transformers from_pretrained + forward", "hf-load", hf),
    ]
    print(f"\n| job | seconds | peak RSS GB | peak / size | (peak - import) / size |")
    print("|---|---|---|---|---|")
    for label, job, src in jobs:
        r = run(job, src, workdir / "out")
        size = folder_bytes(src)
        print(f"| {label} | {r['seconds']:.1f} | {r['peak'] / 1e9:.2f} | {r['peak'] / size:.2f}x "
              f"| {(r['peak'] - r['base']) / size:.2f}x |")
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
