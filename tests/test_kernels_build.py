"""Building herd's CPU kernels (kernels.cpu_kernels): a build folder keyed by the source, flags, torch, Python and
CPU; a stale build lock left by a killed process is recovered instead of waited on forever; one line on stderr
while building. torch's compiler call is replaced by a stand-in that uses torch's real FileBaton, so these tests
need neither a compiler nor AVX-512."""

import os
import threading
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp
from torch.utils.file_baton import FileBaton

from herd import kernels


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """cpu_kernels() with a stand-in for torch's load(): FileBaton(build_directory/lock) as torch takes it, then a
    file for the library. Records the build folders; TORCH_EXTENSIONS_DIR is a temp folder."""
    builds = []

    def load(name, sources, extra_cflags, build_directory, is_python_module, verbose):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():  # what torch does (cpp_extension._jit_compile)
            try:
                builds.append(Path(build_directory))
                (Path(build_directory) / f"{name}.so").write_bytes(b"")
            finally:
                baton.release()
        else:
            baton.wait()  # forever, if the lock file is stale

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("HERD_CPU_KERNELS", raising=False)
    monkeypatch.setattr(cpp, "load", load)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"})
    monkeypatch.setattr(kernels, "_register_fakes", lambda: None)
    monkeypatch.setattr(kernels, "_self_test", lambda: True)
    monkeypatch.setattr(kernels, "_KERNELS", None)
    return builds


def _run_bounded(timeout: float = 30.0) -> bool:
    """cpu_kernels() in a thread, failing the test (not hanging it) if it does not return in `timeout` s."""
    out = []
    t = threading.Thread(target=lambda: out.append(kernels.cpu_kernels()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "cpu_kernels() is waiting on a lock"
    return out[0]


def test_stale_lock_of_a_killed_build_is_recovered(fake_build, capfd):
    assert _run_bounded() is True
    (folder,) = fake_build
    assert folder.parent.name == "ext" and folder.name.startswith("herd_cpu_gemv-")
    assert "building herd's CPU kernels (about 30 s, once)" in capfd.readouterr().err
    # a build killed mid-way leaves torch's lock file behind (and no library)
    (folder / "lock").write_bytes(b"")
    (folder / "herd_cpu_gemv.so").unlink()
    kernels._KERNELS = None
    assert _run_bounded() is True
    assert not (folder / "lock").exists() and len(fake_build) == 2
    assert capfd.readouterr().err.count("building herd's CPU kernels") == 1
    # built once: no message the next time
    kernels._KERNELS = None
    assert _run_bounded() is True
    assert "building" not in capfd.readouterr().err


def test_build_folder_is_keyed_by_the_source(fake_build, tmp_path, monkeypatch):
    assert _run_bounded() is True
    other = tmp_path / "other-install" / "herd"
    (other / "csrc").mkdir(parents=True)
    (other / "csrc" / "cpu_gemv.cpp").write_text("// another version of the kernels\n")
    monkeypatch.setattr(kernels, "__file__", str(other / "kernels.py"))
    kernels._KERNELS = None
    assert _run_bounded() is True
    a, b = fake_build
    assert a != b and a.parent == b.parent  # two installs, two folders: neither rebuilds the other's
    kernels._KERNELS = None
    assert _run_bounded() is True and len(fake_build) == 3 and fake_build[2] == b
