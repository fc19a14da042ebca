"""Set-up by need (scripts/setup.sh): the README's first command installs what `herd serve` needs and nothing that
only the tests need; `--test` adds the test extras; .ci/run runs the README's test command verbatim."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
TEST_ONLY = {"pytest", "hypothesis", "transformers", "llama-cpp-python", "lm-eval", "peft", "httpx", "openai",
             "ollama", "playwright"}


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_runtime_dependencies_hold_nothing_only_the_tests_need():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = _names(project["dependencies"]), _names(project["optional-dependencies"]["test"])
    assert TEST_ONLY <= test
    assert not runtime & TEST_ONLY
    assert {"torch", "fastapi", "uvicorn", "safetensors", "tiktoken"} <= runtime  # what `herd serve` imports


def test_the_readme_commands_and_ci():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/setup.sh && .venv/bin/herd serve" in readme
    test_cmd = "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"
    assert test_cmd in readme
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_cmd in ci


def _fake_venv(tmp_path: Path) -> Path:
    """A copy of scripts/setup.sh beside a .venv whose python logs its arguments and installs nothing."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "setup.sh").write_text(SETUP.read_text())
    bin_ = repo / ".venv" / "bin"
    bin_.mkdir(parents=True)
    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "calls.log"
    (bin_ / "python").write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  *sysconfig*) echo {site} ;;
  "-m pip"*) echo "Collecting something"; echo "Successfully installed something" ;;
  "-c "*) exit 1 ;;  # import checks: nothing is installed yet
esac
""")
    os.chmod(bin_ / "python", 0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return repo


def test_the_first_command_installs_runtime_only_and_reports_each_step(tmp_path):
    repo = _fake_venv(tmp_path)
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)}, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text()
    pip = [c for c in calls.splitlines() if c.startswith("-m pip")]
    assert any(c.endswith("install torch==2.13.0") for c in pip)
    assert any(c.endswith("install -e .") for c in pip)
    assert not any("[test]" in c or "llama-cpp" in c or "wheel" in c for c in pip), pip
    steps = [line for line in r.stderr.splitlines() if line.startswith("setup [")]
    assert len(steps) >= 4 and "done in" in steps[-1]
    assert "Collecting something" in r.stdout  # pip's own per-package lines come through
    assert (tmp_path / "site" / "herd-lm-eval.pth").is_file()


def test_the_test_command_says_what_it_builds_and_how_long():
    text = SETUP.read_text()
    test_part = text[text.index('if [ "$TEST" = 1 ]'):]
    assert 'pip install -e ".[test]"' in test_part and "llama-cpp-python" in test_part and "chromium" in test_part
    assert "about 5 minutes" in test_part and 'pip install -e ".[test]"' not in text[: text.index('if [ "$TEST" = 1 ]')]
    r = subprocess.run(["bash", str(SETUP), "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
    assert subprocess.run(["bash", "-n", str(SETUP)]).returncode == 0
