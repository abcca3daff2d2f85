"""CPU-side build check: every CUDA source compiles with nvcc for each target architecture (no GPU needed).

Skipped when nvcc or PyTorch's C++ headers are absent. What is compiled mirrors convrot.kernels.build_flags:
rotate_quant.cu and gemm_mma_s4.cu for sm_80/86/89/90a in one call each (plus sm_120, for information only: a
failure there is reported as a skip, not an error); the CUTLASS sm_90 GEMM TUs are real code only for sm_90a and a
stub elsewhere (the stub is compiled for sm_80). Only gemm_sm90_bf16_big.cu of the nine CUTLASS TUs is compiled by
default (the other eight are the same template with another output type or tile shape); CONVROT_BUILD_TEST_ALL=1
compiles all nine instead (CI does), in one nvcc call through a file that includes them: their cost is nearly all
the shared CUTLASS headers, so one call for nine costs about what two separate ones do.

Speed (the CUTLASS TU alone takes 40-100 s and ~5 GB of RAM):
- nvcc calls run in parallel, as many as the CPUs (and RAM, 6 GB per call) allow; CONVROT_BUILD_TEST_JOBS=N
  overrides. The longest calls start first (durations of the previous run are remembered).
- A call whose inputs did not change since it last succeeded is not repeated: the cache key is a hash of the
  nvcc and host-compiler versions, the complete command line (flags and include folders), the bytes of the
  source and of every csrc header it includes, and the torch and nvidia-cutlass versions. Keys of successful
  builds are kept in $CONVROT_BUILD_TEST_CACHE (default ~/.cache/convrot-ci/kernels-build); set it to `off` to
  compile everything.
- CONVROT_BUILD_TEST_ONLY=rotate_quant,sm_120 (comma-separated substrings of a source name or target label)
  compiles only the matching calls, for work on one kernel.
- One line per nvcc call (started, finished, from cache) and a line a minute while calls run, written past
  pytest's output capture, so a long compile never looks like a hang, also under `pytest -q`.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"


def _nvcc():
    from torch.utils import cpp_extension

    cands = [shutil.which("nvcc")]
    if cpp_extension.CUDA_HOME:
        cands.append(str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))
    for c in cands:
        if c and Path(c).exists():
            return c
    return None


def _cuda_include_dir() -> Path | None:
    """The toolkit's include folder. A CPU build of torch never sets cpp_extension.CUDA_HOME, so look for it."""
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _nvcc()
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    homes += ["/usr/local/cuda"] + sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    for h in homes:
        for inc in (Path(h) / "include", Path(h) / "cuda" / "include") if h else ():
            if (inc / "cuda_runtime_api.h").is_file() and (inc / "crt" / "host_defines.h").is_file():
                return inc
    return None


_GENERATED_MACROS = """#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
"""


def _shim_dir() -> Path:
    """CPU builds of torch ship c10/cuda headers but not the one their CMake generates; CUDA builds contain it
    with this single definition. The shim is only for this compile check: the real build runs against a CUDA torch."""
    d = Path(__file__).resolve().parent / ".." / "build" / "header_shim"
    f = d / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(_GENERATED_MACROS)
    return d.resolve()


def _include_flags():
    from torch.utils import cpp_extension

    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        raise RuntimeError("CUDA toolkit headers (cuda_runtime_api.h) not found")
    # torch's own headers: CPU builds ship the ATen/c10 CUDA headers too, less one generated file
    dirs = list(cpp_extension.include_paths()) + [str(cuda_inc), sysconfig.get_paths()["include"]]
    torch_inc = Path(cpp_extension.include_paths()[0])
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        dirs.append(str(_shim_dir()))
    # CUDA library headers (cusparse.h, cublas_v2.h) that PyTorch's headers include may come from the
    # nvidia-* wheels rather than the toolkit.
    import site

    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for inc in Path(sp).glob("nvidia/*/include"):
            dirs.append(str(inc))
    return [f"-I{d}" for d in dirs]


def _std_flag():
    from torch.utils import cpp_extension

    aten = Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h"
    try:
        needs20 = "C++20" in aten.read_text()
    except OSError:
        needs20 = False
    return "-std=c++20" if needs20 else "-std=c++17"


def _gencode(cc):
    arch = "90a" if cc == (9, 0) else f"{cc[0]}{cc[1]}"
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def _merged_sm90(sources) -> Path:
    """A translation unit that includes the given csrc/ sources. Its name is a hash of its text (the path is part
    of the cache key, and clones or users sharing the temporary folder must not rewrite each other's), written
    atomically."""
    text = "".join(f'#include "{CSRC / src}"\n' for src in sources)
    folder = Path(tempfile.gettempdir()) / f"convrot-ci-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path = folder / f"gemm_sm90_merged_{hashlib.sha256(text.encode()).hexdigest()[:16]}.cu"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def _jobs():
    """(label, source, flags) per nvcc call. One call covers several architectures of a source, so the heavy
    host-side pass over PyTorch's headers runs once per source instead of once per architecture."""
    from convrot.kernels import SOURCES_SM90, build_flags, cutlass_include_dirs

    cut = cutlass_include_dirs()
    std = _std_flag()

    def flags(cc, cutlass):
        _, f, _ = build_flags(cc, cutlass)
        return [x for x in f if not x.startswith("-gencode") and not x.startswith("-std=")] + [std]

    required = [(8, 0), (8, 6), (8, 9), (9, 0)]
    jobs = []
    # The CUTLASS TUs: real code only for sm_90a (the other eight are the same template with another output
    # type or tile shape; CONVROT_BUILD_TEST_ALL=1 compiles them too), a stub on every other architecture.
    if cut is not None:
        if os.environ.get("CONVROT_BUILD_TEST_ALL"):
            # All nine in one call: nearly all of a CUTLASS TU's 80-100 s is parsing and optimizing the shared
            # headers, and one more instantiation adds ~8 s (bench/NOTES.md, CI time), so one call that includes
            # the nine costs about what two separate ones do. Each still compiles with its own entry.
            jobs.append((f"sm_90a ({len(SOURCES_SM90)} TUs, one call)", str(_merged_sm90(SOURCES_SM90)),
                         flags((9, 0), cut) + [_gencode((9, 0))]))
        else:
            jobs.append(("sm_90a", "gemm_sm90_bf16_big.cu", flags((9, 0), cut) + [_gencode((9, 0))]))
    jobs.append(("sm_80 (stub)", "gemm_sm90_bf16_big.cu", flags((8, 0), None) + [_gencode((8, 0))]))
    for src in ("rotate_quant.cu", "gemm_mma_s4.cu"):
        jobs.append(("sm_80/86/89/90a", src, flags((8, 0), None) + [_gencode(cc) for cc in required]))
        jobs.append(("sm_120", src, flags((12, 0), None) + [_gencode((12, 0))]))
    return jobs


# ------------------------------------------------------------------------------------ parallel, cached nvcc calls

# Relative cost of a call, for the first run's ordering (later runs use the measured times): rotate_quant.cu
# instantiates the most device code, and the multi-architecture calls compile it four times.
_DEFAULT_COST = {("sm_80/86/89/90a", "rotate_quant.cu"): 1000.0, ("sm_80/86/89/90a", "gemm_mma_s4.cu"): 600.0,
                 ("sm_120", "rotate_quant.cu"): 250.0, ("sm_120", "gemm_mma_s4.cu"): 150.0, "sm_90a": 120.0,
                 "sm_80 (stub)": 40.0}
_MERGED_COST = 220.0  # the merged CUTLASS call


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_MEM_PER_CALL = 6 << 30


def _cache_dir() -> Path | None:
    env = os.environ.get("CONVROT_BUILD_TEST_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    root = Path(env) if env else Path.home() / ".cache" / "convrot-ci"
    d = (root / "kernels-build") if not env else root
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d


def _tool_version(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:
        return f"unknown ({type(e).__name__})"


_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def _local_sources(src: Path) -> list[Path]:
    """The source and every header of csrc/ it includes, transitively (quoted includes only)."""
    seen, todo = [], [src]
    while todo:
        f = todo.pop()
        if f in seen or not f.is_file():
            continue
        seen.append(f)
        for inc in _INCLUDE.findall(f.read_text(errors="replace")):
            todo.append((f.parent / inc).resolve())
    return sorted(seen)


def _versions() -> str:
    from importlib import metadata

    parts = [f"torch {torch.__version__}"]
    try:
        parts.append(f"nvidia-cutlass {metadata.version('nvidia-cutlass')}")
    except Exception:
        parts.append("nvidia-cutlass none")
    return "; ".join(parts)


def _cache_key(cmd_without_output: list[str], src: Path, toolchain: str) -> str:
    h = hashlib.sha256()
    h.update(toolchain.encode())
    h.update("\0".join(cmd_without_output).encode())
    for f in _local_sources(src):
        h.update(f"\0{f.name}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _workers(n_jobs: int) -> int:
    env = os.environ.get("CONVROT_BUILD_TEST_JOBS")
    if env and env.isdigit() and int(env) > 0:
        return min(int(env), n_jobs)
    cpus = _cpus()
    by_mem = cpus
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        by_mem = max(1, avail // _MEM_PER_CALL)
    except (OSError, ValueError, AttributeError):
        pass
    return max(1, min(cpus, by_mem, n_jobs))


class _Progress:
    """Lines to the real stderr, past pytest's capture (fd-level under -q), so they appear as they happen."""

    def __init__(self, config):
        self.capman = config.pluginmanager.getplugin("capturemanager") if config is not None else None
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"\n[kernel build {time.time() - self.t0:5.0f} s] {msg}" if msg else "\n"
        if self.capman is not None:
            with self.capman.global_and_fixture_disabled():
                sys.stderr.write(line)
                sys.stderr.flush()
        else:
            sys.__stderr__.write(line)
            sys.__stderr__.flush()


def _run_nvcc(cmd) -> tuple[int, str, float | None]:
    """(exit status, stderr tail, CPU seconds of nvcc and the compilers it ran, where the OS reports them)."""
    if not hasattr(os, "wait4"):
        p = subprocess.run(cmd, capture_output=True, text=True)
        return p.returncode, p.stderr[-3000:], None
    with tempfile.TemporaryFile() as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read().decode(errors="replace")[-3000:]
    return p.returncode, err, ru.ru_utime + ru.ru_stime


def _compile_all(jobs, nvcc, inc, out_dir: Path, say, cache: Path | None):
    """Run every (label, src, flags) job; [(label, src, status, seconds, stderr, cpu seconds)], status ok/FAILED/cached."""
    toolchain = "\n".join([_tool_version([nvcc, "--version"]),
                           _tool_version([os.environ.get("NVCC_CCBIN") or shutil.which("c++") or "c++", "--version"]),
                           _versions()])
    timings_file = cache / "timings.json" if cache else None
    try:
        timings = json.loads(timings_file.read_text()) if timings_file and timings_file.exists() else {}
    except (OSError, ValueError):
        timings = {}

    work, results = [], []
    for i, (label, src, flags) in enumerate(jobs):
        out = out_dir / f"{i:02d}_{Path(src).name}.o"
        base = [nvcc, "-c", str(CSRC / src), *flags, *inc, "-Xptxas", "-warn-spills"]
        n_arch = sum(f.startswith("-gencode") for f in flags)
        if n_arch > 1:  # nvcc compiles the architectures of one call in parallel: no idle core at the end
            base += ["--threads", str(min(n_arch, _cpus()))]
        key = _cache_key(base, CSRC / src, toolchain)
        if cache is not None and (cache / f"{key}.ok").exists():
            results.append((label, src, "cached", 0.0, "", None))
            say(f"{label} {src}: unchanged since a successful build, not recompiled (cache {key[:12]})")
            continue
        cost = timings.get(f"{label} {src}", _DEFAULT_COST.get((label, src), _DEFAULT_COST.get(
            label, _MERGED_COST if "one call" in label else 60.0)))
        work.append((cost, i, label, src, base + ["-o", str(out)], key))
    work.sort(key=lambda w: -w[0])  # longest first: the last call to finish is a short one
    n = len(work)
    if not n:
        return results
    workers = _workers(n)
    say(f"{n} nvcc calls to run ({len(results)} from cache), {workers} at a time")

    events: queue.Queue = queue.Queue()
    running: dict[str, float] = {}

    def run(w):
        _, _, label, src, cmd, key = w
        events.put(("start", label, src))
        t0 = time.time()
        try:
            rc, err, cpu = _run_nvcc(cmd)
        except Exception as e:  # nvcc vanished, out of memory...
            rc, err, cpu = -1, f"{type(e).__name__}: {e}", None
        events.put(("done", label, src, rc, time.time() - t0, err, key, cpu))

    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(run, w) for w in work]
        finished = 0
        while finished < n:
            try:
                ev = events.get(timeout=60)
            except queue.Empty:
                now = time.time()
                say("still compiling: " + ", ".join(f"{k} ({now - t:.0f} s)" for k, t in running.items()))
                continue
            if ev[0] == "start":
                running[f"{ev[1]} {ev[2]}"] = time.time()
                say(f"started {ev[1]} {ev[2]}")
                continue
            _, label, src, rc, dt, err, key, cpu = ev
            running.pop(f"{label} {src}", None)
            finished += 1
            status = "ok" if rc == 0 else "FAILED"
            say(f"[{finished}/{n}] {label} {src}: {status} in {dt:.0f} s"
                + (f" ({cpu:.0f} s of CPU)" if cpu is not None else ""))
            results.append((label, src, status, dt, err, cpu))
            timings[f"{label} {src}"] = round(dt, 1)
            if rc == 0 and cache is not None:
                (cache / f"{key}.ok").write_text(json.dumps({"label": label, "src": src, "seconds": round(dt, 1),
                                                              "when": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        for f in futures:
            f.result()
    if timings_file is not None:
        try:
            timings_file.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass
    return results


def test_compile_all_sources(tmp_path, pytestconfig):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine)")
    try:
        inc = _include_flags()
    except Exception as e:
        pytest.skip(f"PyTorch C++ headers unavailable: {e}")
    jobs = _jobs()
    only = os.environ.get("CONVROT_BUILD_TEST_ONLY")  # e.g. "rotate_quant" or "sm_120": a subset, for development
    if only:
        jobs = [j for j in jobs if any(o and (o in j[1] or o in j[0]) for o in only.split(","))]
        if not jobs:
            pytest.skip(f"CONVROT_BUILD_TEST_ONLY={only} matches no nvcc call")
    from convrot.kernels import cutlass_include_dirs

    say = _Progress(pytestconfig)
    cache = _cache_dir()
    t0 = time.time()
    results = _compile_all(jobs, nvcc, inc, tmp_path, say, cache)
    total = time.time() - t0
    failures, sm120 = [], []
    for label, src, status, dt, err, _ in results:
        if status == "FAILED":
            (sm120 if label == "sm_120" else failures).append(f"{label} {src}:\n{err}")
    compiled = [r for r in results if r[2] != "cached"]
    cpu = sum(r[5] or 0.0 for r in compiled)
    say(f"done: {len(jobs)} nvcc calls, {len(compiled)} compiled ({sum(r[3] for r in compiled):.0f} s of "
        f"compiling, {cpu:.0f} s of CPU), {len(results) - len(compiled)} from cache, {total:.0f} s wall"
        + (f"; cache {cache}" if cache else "; cache off"))
    say("")
    sys.stderr.flush()
    assert not failures, "\n\n".join(failures)
    if cutlass_include_dirs() is None:
        pytest.skip("compiled everything except the sm_90 CUTLASS GEMM: pip install nvidia-cutlass==4.2.0.0")
    if sm120:
        pytest.skip("all required targets built; sm_120 did not: " + "\n".join(sm120)[:2000])


def test_ops_cpp_syntax():
    """The host-only registration TU (g++ through PyTorch's flags), syntax only: quick."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    try:
        inc = _include_flags()
    except Exception as e:
        pytest.skip(f"PyTorch C++ headers unavailable: {e}")
    found = [_cuda_include_dir()]
    if found[0] is None:
        pytest.skip("CUDA runtime headers not found")
    cuda_inc = f"-I{found[0]}"
    for defs in ([], ["-DCONVROT_SM90"]):
        p = subprocess.run([cxx, "-fsyntax-only", _std_flag(), *defs, cuda_inc, *inc, str(CSRC / "ops.cpp")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
