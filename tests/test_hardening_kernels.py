"""Issue 13.1: the kernel build cache survives killed builds, damaged libraries and read-only folders.

Each "start" is a fresh Python process (a library mapped into a process cannot be replaced under it), building a
one-function C++ library with the same build_cached the CUDA kernels use (cpp_extension + ninja, about 3 s).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("ninja") is None or shutil.which("c++") is None,
                                reason="needs ninja and a C++ compiler")

START = textwrap.dedent("""
    import ctypes, sys
    sys.path.insert(0, {repo!r})
    from convrot.kernels import build_cached
    so = build_cached("probe", [{src!r}], [], [], [], {folder!r}, wait_s={wait})
    print("VALUE", ctypes.CDLL(so).convrot_probe())
""")


def start(src, folder, wait=60, read_only=False, timeout=120):
    """One process start: build or load the probe library; (returncode, stdout + stderr). `read_only` runs it
    with `folder` mounted read-only (root, in a private mount namespace) or with its write bits cleared."""
    cmd = [sys.executable, "-c", START.format(repo=str(REPO), src=str(src), folder=str(folder), wait=wait)]
    if read_only:
        f = shlex.quote(str(folder))
        cmd = ["unshare", "-m", "sh", "-c", f"mount --bind {f} {f} && mount -o remount,bind,ro {f} && exec "
               + " ".join(shlex.quote(c) for c in cmd)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def can_mount_read_only(tmp_path) -> bool:
    d = tmp_path / "ro_probe"
    d.mkdir()
    f = shlex.quote(str(d))
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {f} {f} && mount -o remount,bind,ro {f} && "
                        f"! touch {f}/x"], capture_output=True) if shutil.which("unshare") else None
    return r is not None and r.returncode == 0


def probe_source(tmp_path, value=7):
    src = tmp_path / "probe.cpp"
    src.write_text(f'extern "C" int convrot_probe() {{ return {value}; }}\n')
    return src


def test_lock_left_by_a_killed_build_does_not_hang_the_next_start(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "lock").write_text("")  # what cpp_extension's FileBaton leaves when its build is killed
    rc, out = start(probe_source(tmp_path), folder, timeout=90)  # the old code waits on it forever
    assert rc == 0 and "VALUE 7" in out, out
    assert "stale build lock" in out and not (folder / "lock").exists()


def test_truncated_cached_library_is_rebuilt(tmp_path):
    src, folder = probe_source(tmp_path), tmp_path / "cache"
    assert start(src, folder)[0] == 0
    so = folder / "probe.so"
    so.write_bytes(so.read_bytes()[:200])  # a full disk or a kill during the link
    rc, out = start(src, folder)
    assert rc == 0 and "VALUE 7" in out, out
    assert "rebuild" in out


def test_read_only_cache_with_a_valid_build_is_used(tmp_path):
    src, folder = probe_source(tmp_path), tmp_path / "cache"
    assert start(src, folder)[0] == 0
    if not can_mount_read_only(tmp_path):
        pytest.skip("needs root with mount namespaces (unshare -m) to make a read-only folder")
    rc, out = start(src, folder, read_only=True)  # the old code fails creating cpp_extension's lock file there
    assert rc == 0 and "VALUE 7" in out, out


def test_waiter_never_loads_an_old_library_after_a_failed_rebuild(tmp_path):
    src, folder = probe_source(tmp_path), tmp_path / "cache"
    assert start(src, folder)[0] == 0
    src.write_text("#error this rebuild fails\n")  # the sources changed and their build fails
    # another process holds the build lock (a rebuild in progress) and then fails without a new build
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(REPO)!r})
        from convrot.kernels import BuildLock
        with BuildLock({str(folder)!r}):
            open({str(held)!r}, "w").close()
            time.sleep(2)
    """)])
    try:
        for _ in range(300):
            if held.exists():
                break
            time.sleep(0.05)
        t0 = time.time()
        rc, out = start(src, folder)
        waited = time.time() - t0
    finally:
        holder.wait(timeout=30)
    assert rc != 0 and "VALUE" not in out, out  # the old library must not come back as if it were the new one
    assert "this rebuild fails" in out and waited > 0.5


def test_a_live_build_is_waited_for_with_a_limit(tmp_path):
    from convrot.kernels import BuildLock
    with BuildLock(tmp_path):
        t0 = time.time()
        with pytest.raises(TimeoutError, match="build lock"):
            with BuildLock(tmp_path, wait_s=0.5):
                pass
        assert time.time() - t0 >= 0.5
    with BuildLock(tmp_path, wait_s=0.5):  # released with its holder
        pass


def test_cache_key_has_torchs_full_version():
    import torch
    from convrot.kernels import _cache_dir
    tag = _cache_dir((9, 0)).name
    local = torch.__version__.partition("+")[2]
    assert torch.__version__.split("+")[0] in tag
    if local:
        assert local in tag  # 2.9.0+cu128 and 2.9.0+cu130 builds must not share one cache
