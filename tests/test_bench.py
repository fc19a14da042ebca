"""`herd bench`: the fingerprint, the table built from each benchmark script's JSON, and failed children."""

import json
import subprocess
import sys
import textwrap

import pytest

from herd import bench
from herd.cli import main


@pytest.fixture(scope="module")
def fp():
    return bench.fingerprint("cpu", preset="smoke")


def test_fingerprint_fields_are_measured(fp):
    assert fp.device == "cpu" and fp.processor and fp.torch and fp.gpu is None
    assert fp.threads >= 1 and fp.cpu_count >= 1 and fp.buffer_mib == 256
    assert set(fp.matmul_tflops) == {"bf16", "fp32"} and all(v > 0 for v in fp.matmul_tflops.values())
    assert "torch_sum" in fp.bandwidth_gb_s and all(v > 0 for v in fp.bandwidth_gb_s.values())
    assert ("herd_read" in fp.bandwidth_gb_s) == fp.kernels


def test_cuda_fingerprint_without_a_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device: test_cuda_fingerprint covers it")
    with pytest.raises(bench.BenchError, match="no CUDA device"):
        bench.fingerprint("cuda", preset="smoke")


def test_cuda_fingerprint():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = bench.fingerprint("cuda", preset="smoke").gpu
    assert g["name"] and g["bandwidth_gb_s"]["cuda_copy"] > 0 and g["matmul_tflops"]["bf16"] > 0


def test_cli_smoke_runs_every_benchmark(tmp_path):
    """The real scripts at their smoke sizes, through the installed command line."""
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "herd", "bench", "--smoke", "--only", "decode,train,serve", "--json",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| benchmark")]
    benches = [ln.split("|")[1].strip() for ln in table]
    # decode: F.linear, herd kernels, int8, int4, then bf16/int8/int4 vs llama.cpp; prefill; train: eager (smoke
    # skips compile); serve: 4 clients
    assert benches == ["decode"] * 7 + ["prefill", "train", "serve"], p.stdout
    assert "FAILED" not in p.stdout and "of memory roofline" in p.stdout and "MFU" in p.stdout
    assert "64-token prompt" in p.stdout and "of bf16 matmul peak" in p.stdout
    for stage in ("decode", "train", "serve"):  # progress lines
        assert f"{stage}: done" in p.stderr
    res = json.loads(out.read_text())
    assert res["ok"] and res["preset"] == "smoke"
    assert res["fingerprint"]["matmul_tflops"]["bf16"] > 0 and res["fingerprint"]["bandwidth_gb_s"]["torch_sum"] > 0
    assert p.stdout.startswith(f"# herd bench (smoke): {res['fingerprint']['processor']}")
    assert set(res["stages"]) == {"decode", "train", "serve"} and all(s["ok"] for s in res["stages"].values())
    rows = res["rows"]
    assert all(r["value"] > 0 and r["ratio"] > 0 and r["baseline_value"] > 0 for r in rows)
    decode = res["stages"]["decode"]["result"]
    assert [r["baseline"] for r in rows[4:7]] == ["llama.cpp BF16", "llama.cpp Q8_0", "llama.cpp Q4_0"]
    for row, width in zip(rows[4:7], ("bf16", "int8", "int4")):
        assert row["ratio"] == pytest.approx(decode["vs_llama_cpp"][width])
    serve = res["stages"]["serve"]["result"]["levels"]
    assert rows[-1]["ratio"] == pytest.approx(serve[1]["tok_s"] / serve[0]["tok_s"])
    train = res["stages"]["train"]["result"]
    herd_row, hf_row = train["rows"]
    assert rows[8]["ratio"] == pytest.approx(herd_row["tok_s"] / hf_row["tok_s"])


def test_bad_only_is_a_clear_error(capsys):
    with pytest.raises(bench.BenchError, match="unknown benchmark gpu"):
        bench.parse_only("decode,gpu")
    assert bench.parse_only("serve, decode") == ["decode", "serve"]
    assert main(["bench", "--smoke", "--only", "prefill"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark prefill" in err and "decode stage" in err and "Traceback" not in err
    # an unwritable --json is refused before any benchmark runs
    assert main(["bench", "--smoke", "--only", "decode", "--json", "/nonexistent-folder/bench.json"]) == 2
    out = capsys.readouterr()
    assert "folder /nonexistent-folder does not exist" in out.err and "decode:" not in out.err and not out.out


def _script(path, body: str) -> None:
    path.write_text(textwrap.dedent(body))


DECODE_JSON = {
    "rows": [
        {"name": "herd bf16 eager, herd kernels", "tok_s": 20.0, "roofline_frac": 0.5, "note": ""},
        {"name": "transformers bf16 eager", "tok_s": 8.0, "roofline_frac": 0.2, "note": ""},
        {"name": "herd int8 eager, herd kernels", "tok_s": 32.0, "roofline_frac": 0.4, "note": ""},
        {"name": "herd int4 eager, herd kernels", "tok_s": 50.0, "roofline_frac": 0.25, "note": ""},
    ],
    "prefill_tok_s": {"herd": 300.0, "transformers": 200.0},
}


def test_rows_failed_children_and_exit_code(tmp_path, monkeypatch, capsys):
    """Fake scripts: one writes known JSON (the table's arithmetic), one crashes, one exits 0 without results."""
    _script(tmp_path / "decode.py", f"""
        import json, sys
        json.dump({DECODE_JSON!r}, open(sys.argv[sys.argv.index("--json") + 1], "w"))
    """)
    _script(tmp_path / "train.py", """
        import sys
        print("warming up")
        sys.exit("RuntimeError: out of memory in the training step")
    """)
    _script(tmp_path / "serve.py", "print('forgot the json')\n")
    lines = []
    report = bench.run_bench(preset="smoke", bench_dir=tmp_path, log=lines.append)
    assert not report.ok
    assert [(r.bench, r.what) for r in report.rows] == [
        ("decode", "bf16 eager, herd kernels"), ("decode", "int8 eager, herd kernels"),
        ("decode", "int4 eager, herd kernels"),
        ("prefill", "bf16, time to first token"), ("train", "FAILED"), ("serve", "FAILED")]
    # bf16 vs transformers; int8 vs herd bf16 and int4 vs herd int8, in the same mode
    assert [r.ratio for r in report.rows[:4]] == pytest.approx([2.5, 1.6, 50 / 32, 1.5])
    assert report.rows[2].baseline == "herd int8 eager"
    assert report.rows[4].error == "exit code 1: RuntimeError: out of memory in the training step"
    assert report.rows[5].error == "wrote no JSON results: forgot the json"
    assert "    warming up" in lines and any(ln.startswith("[2/3] train: FAILED") for ln in lines)
    table = bench.format_report(report)
    assert "| decode | bf16 eager, herd kernels | 20.0 tok/s | transformers bf16 8.0 tok/s | 2.50x | " \
           "50.0% of memory roofline |" in table
    assert "| train | **FAILED** | - | - | - | exit code 1: RuntimeError: out of memory" in table
    d = report.to_dict()
    assert not d["ok"] and d["stages"]["train"]["returncode"] == 1 and "warming up" in d["stages"]["train"]["tail"]

    # the command line: a failed stage is a row and exit code 1, not a traceback
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "--smoke", "--only", "train"]) == 1
    out = capsys.readouterr()
    assert "| train | **FAILED** |" in out.out and "Traceback" not in out.err
    with pytest.raises(bench.BenchError, match="no decode.py"):
        bench.run_bench(only="decode", preset="smoke", bench_dir=tmp_path / "empty")


def test_bad_model_path_is_a_failed_decode_row(tmp_path):
    """The real decode script given a checkpoint that does not exist."""
    p = subprocess.run([sys.executable, "-m", "herd", "bench", "--smoke", "--only", "decode", "--model",
                        str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "| decode | **FAILED** |" in p.stdout and "no such file" in p.stdout
    assert p.stderr.rstrip().splitlines()[-1].startswith("[1/1] decode: FAILED")  # herd itself did not crash


def test_device_goes_to_the_decode_stage_only():
    """`herd bench --device cuda` passes --device cuda to decode.py."""
    assert "--device" in bench.stage_args("decode", "smoke", 2, device="cuda")
    assert "--device" not in bench.stage_args("train", "smoke", 2, device="cuda")


def test_decode_script_on_cuda_without_a_gpu_is_a_usage_error():
    """decode.py --device cuda on a machine without a GPU: exit status 2 and a clear message."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device: the GPU run itself is the benchmark, not a unit test")
    p = subprocess.run([sys.executable, str(bench.benchmarks_dir() / "decode.py"), "--smoke", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "torch sees no CUDA device" in p.stderr


def test_decode_script_says_why_llama_cpp_did_not_run():
    """llama.cpp needs a GGUF with the Llama 3 tokenizer: another vocabulary size skips it, in words."""
    p = subprocess.run([sys.executable, str(bench.benchmarks_dir() / "decode.py"), "--smoke", "--no-hf",
                        "--no-quant", "--prefill", "0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "## llama.cpp: skipped (the GGUF needs the Llama 3 vocabulary (128256 ids), this run's vocab is 4096)" \
        in p.stdout
    p = subprocess.run([sys.executable, str(bench.benchmarks_dir() / "decode.py"), "--smoke", "--no-hf",
                        "--no-quant", "--prefill", "0", "--no-llama-cpp"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "## llama.cpp: skipped (--no-llama-cpp)" in p.stdout


def test_decode_rows_gpu_names_and_llama_cpp():
    """GPU rows carry no ", herd kernels" and still find their baselines; llama.cpp rows become comparisons of herd's
    fastest row of each width (eager or compiled) against the matching GGUF type."""
    res = {"rows": [
        {"name": "herd bf16 eager", "tok_s": 50.0, "roofline_frac": 0.2, "note": ""},
        {"name": "transformers bf16 eager", "tok_s": 40.0, "roofline_frac": 0.16, "note": ""},
        {"name": "herd int8 eager", "tok_s": 30.0, "roofline_frac": 0.06, "note": ""},
        {"name": "herd int8 compiled", "tok_s": 90.0, "roofline_frac": 0.18, "note": "(compile 9 s)"},
        {"name": "llama.cpp BF16", "tok_s": 25.0, "roofline_frac": 0.1, "note": ""},
        {"name": "llama.cpp Q8_0", "tok_s": 45.0, "roofline_frac": 0.09, "note": ""},
        {"name": "llama.cpp Q4_0", "tok_s": 60.0, "roofline_frac": 0.07, "note": ""},  # no herd int4 row: no pair
    ]}
    rows = bench.decode_rows(res)
    assert [(r.what, r.baseline) for r in rows] == [
        ("bf16 eager", "transformers bf16"), ("int8 eager", "herd bf16 eager"),
        ("int8 compiled (compile 9 s)", ""),  # no compiled bf16 row: no baseline, no ratio
        ("bf16 eager vs llama.cpp", "llama.cpp BF16"), ("int8 compiled vs llama.cpp", "llama.cpp Q8_0")]
    assert [r.ratio for r in rows] == [1.25, 0.6, None, 2.0, 2.0]
    assert rows[4].limit == "18.0% of memory roofline (llama.cpp 9.0%)"


def test_free_port_is_below_the_ephemeral_range_and_free():
    import socket
    from pathlib import Path

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = bench._free_port()
        assert 10000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_serve_stage_retries_a_taken_port_and_keeps_the_childs_error(tmp_path):
    """The fake server script fails like benchmarks/serve.py does when its port was taken between the pick and its
    bind; run_stage runs it again on another port. A server that never starts shows its own error."""
    _script(tmp_path / "serve.py", """
        import json, sys
        from pathlib import Path
        port = sys.argv[sys.argv.index("--port") + 1]
        seen = Path(__file__).with_name("ports.txt")
        seen.write_text(seen.read_text() + port + "\\n" if seen.exists() else port + "\\n")
        if len(seen.read_text().split()) < 2 or "never" in sys.argv:
            sys.exit("OSError: [Errno 98] Address already in use; the server did not start")
        json.dump({"levels": []}, open(sys.argv[sys.argv.index("--json") + 1], "w"))
    """)
    lines = []
    res = bench.run_stage("serve", ["--port", "23456"], tmp_path, log=lines.append)
    ports = (tmp_path / "ports.txt").read_text().split()
    assert res.ok and len(ports) == 2 and ports[0] == "23456" and ports[1] != ports[0]
    assert any("retrying on" in ln for ln in lines)
    (tmp_path / "ports.txt").unlink()
    res = bench.run_stage("serve", ["--port", "23456", "never"], tmp_path)
    assert not res.ok and len((tmp_path / "ports.txt").read_text().split()) == bench.PORT_RETRIES
    assert res.error == "exit code 1: OSError: [Errno 98] Address already in use; the server did not start"
    assert res.tail[0].startswith("the server could not start on port 23456, ")
