"""benchmarks/serving.py (issue 18's serving benchmark) at its smoke size, as a subprocess, so the script cannot rot:
every row is in the JSON, herd's own rows ran, and a row whose peer is missing says why."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"
ROWS = ["1_http_vs_generate", "2_generate_vs_llamacpp_bf16", "2_generate_vs_llamacpp_int8", "3_agent_prefix_cache",
        "3_agent_vs_llamacpp", "4_clients_vs_one", "4_clients_vs_llamacpp", "5_kv_memory"]
HERD_ONLY = ["1_http_vs_generate", "3_agent_prefix_cache", "4_clients_vs_one", "5_kv_memory"]


@pytest.mark.slow
def test_smoke_run_has_every_row(tmp_path):
    out = tmp_path / "serving.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr[-5000:]
    res = json.loads(out.read_text())
    rows = {r["id"]: r for r in res["rows"]}
    assert list(rows) == ROWS
    for rid, r in rows.items():
        assert r["status"] in ("ok", "failed", "unavailable"), r
        assert r["status"] != "failed", f"{rid} failed: {r['note']}\n{p.stderr[-5000:]}"
        if r["status"] == "unavailable":  # only a missing peer (llama.cpp, its server's packages) may skip a row
            assert rid not in HERD_ONLY and "llama" in r["note"], r
        else:
            assert r["ratio"] > 0 and r["herd"] and r["peer"] and r["goal"], r
    # one markdown row per JSON row, under the header that names the shapes
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| row ")]
    assert len(table) == len(ROWS), p.stdout
    assert "# rows 1-2: tiny-llama3-vocab" in p.stdout and "# rows 3-4: tiny-llama3-vocab" in p.stdout
    kv = rows["5_kv_memory"]
    assert kv["detail"]["need_bytes"] >= 2 * 16 * 8 * 64 * 2 * 64 * 2000  # Llama-3.2-1B shape, 64 x 2,000 tokens
    agent = rows["3_agent_prefix_cache"]["detail"]
    assert len(agent["on"]["ttft_ms"]) == len(agent["off"]["ttft_ms"]) == res["settings"]["turns"]
