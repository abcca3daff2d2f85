"""CUDA kernels for ConvRot W4A4: build on first use, load, and thin wrappers with the reference's semantics.

Routes by GPU architecture:
- sm_90 (H100/H200): activations -> int8 codes in one pass (rotate + absmax + quantize), packed int4 weights
  sign-extended to int8 (per call, or once through `prepare_weight`), CUTLASS wgmma int8 GEMM with the scales
  and bias fused in its epilogue. Needs the CUTLASS headers (`pip install nvidia-cutlass==4.2.0.0`).
- sm_80/86/87/89: packed int4 activations and weights straight into mma.sync m16n8k64 s4 (scales, bias fused).
- anything else, CPU tensors, a failed build or no nvcc: `available()` is False and callers use the reference.

The extension is compiled with ninja through torch.utils.cpp_extension.load into
~/.cache/convrot/<torch>-cu<cuda>-sm<arch>/ (CONVROT_CACHE_DIR overrides the root) and reused afterwards
(`build_cached`: one process builds at a time, a killed build never blocks later starts, a damaged cached library is
rebuilt, a read-only cache with a valid build is used as it is). Set CONVROT_DISABLE_KERNELS=1 to never build or
use it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("convrot")

_REPO = Path(__file__).resolve().parents[2]
CSRC = _REPO / "csrc"
SOURCES_COMMON = ["ops.cpp", "rotate_quant.cu", "gemm_mma_s4.cu"]
SOURCES_SM90 = [f"gemm_sm90_{d}_{c}.cu" for d in ("bf16", "f16", "f32") for c in ("big", "sk", "small")]
SUPPORTED_CC = {(8, 0), (8, 6), (8, 7), (8, 9), (9, 0)}
GROUP_SIZES = (16, 64, 256)
MAX_K = 65536

_lock = threading.Lock()
_state: dict = {"tried": False, "ops": None, "cc": None, "reason": None}


def _not_available(reason: str):
    _state["reason"] = reason
    # the route line of convrot/routes.py says what runs instead (Triton or the PyTorch reference)
    log.info("ConvRot CUDA extension not available: %s", reason)
    return None


def cutlass_include_dirs() -> list[str] | None:
    """CUTLASS/CuTe include folders: $CONVROT_CUTLASS_DIR (a CUTLASS checkout) or the nvidia-cutlass wheel."""
    roots = []
    env = os.environ.get("CONVROT_CUTLASS_DIR")
    if env:
        roots.append(Path(env))
    try:
        import cutlass_library  # the nvidia-cutlass wheel ships the C++ headers under source/

        roots.append(Path(cutlass_library.__file__).parent / "source")
    except Exception:
        pass
    for root in roots:
        inc = root / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            dirs = [str(inc)]
            util = root / "tools" / "util" / "include"
            if util.is_dir():
                dirs.append(str(util))
            return dirs
    return None


def build_flags(cc: tuple[int, int], cutlass_dirs: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """(sources, nvcc flags, c++ flags) for one architecture. Shared with tests/test_kernels_build.py."""
    major, minor = cc
    sources = [str(CSRC / s) for s in SOURCES_COMMON]
    # sm_90a, not sm_90: wgmma and setmaxnreg exist only in the arch-specific target.
    arch = "90a" if cc == (9, 0) else f"{major}{minor}"
    nvcc = [
        "-O3", "--expt-relaxed-constexpr", "-DNDEBUG",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        # PyTorch's default flags hide the half/bfloat16 operators that CUTLASS relies on.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    cxx = ["-O3"]  # the C++ standard is PyTorch's own (C++17 up to 2.12, C++20 after)
    if cc == (9, 0) and cutlass_dirs:
        sources += [str(CSRC / s) for s in SOURCES_SM90]
        nvcc += ["-DCONVROT_SM90"] + [f"-I{d}" for d in cutlass_dirs]
        cxx += ["-DCONVROT_SM90"]
    else:
        # Stubs keep the registered op set identical on every architecture.
        sources += [str(CSRC / s) for s in SOURCES_SM90]
    return sources, nvcc, cxx


def _cache_dir(cc: tuple[int, int]) -> Path:
    root = Path(os.environ.get("CONVROT_CACHE_DIR", Path.home() / ".cache" / "convrot"))
    # torch's full version, local suffix included: 2.9.0+cu128 and 2.9.0+cu130 (or a nightly) have different ABIs
    version = re.sub(r"[^A-Za-z0-9._-]", "_", torch.__version__)
    tag = f"{version}-cu{(torch.version.cuda or 'none').replace('.', '')}-sm{cc[0]}{cc[1]}"
    return root / tag


# ---------------------------------------------------------------- cached builds

LOCK_NAME = "convrot.lock"       # ours: an OS lock (flock), released by the kernel when its holder dies
STAMP_NAME = "convrot_build.json"  # written after a successful build: which sources and flags the library is from
TORCH_LOCK_NAME = "lock"          # cpp_extension's FileBaton: a plain file, left behind forever by a killed build
BUILD_WAIT_S = float(os.environ.get("CONVROT_BUILD_WAIT_S", 1800))  # longest wait for another process's build


class BuildLock:
    """An exclusive lock on a build folder, held while one process builds or loads the library there.

    cpp_extension's own lock is a file that only its creator removes, and its waiters poll it without a timeout:
    a build killed by the user (Ctrl-C during a long compile, a closed terminal, an OOM kill) hangs every later
    start. This lock is flock/msvcrt based, so the OS drops it with its holder; waiting for a live holder has a
    limit. `writable` is False when the folder cannot be written (a read-only cache): then nothing is built.
    """

    def __init__(self, folder: Path, wait_s: float = BUILD_WAIT_S):
        self.folder, self.wait_s, self.fd, self.writable = Path(folder), wait_s, None, False

    def __enter__(self) -> "BuildLock":
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            self.writable = os.access(self.folder, os.W_OK)
        except OSError:
            try:  # a read-only cache: lock (shared with readers) only if a lock file is already there
                self.fd = os.open(path, os.O_RDONLY)
            except OSError:
                self.fd = None
        if self.fd is not None:
            self._acquire(path)
        return self

    def _acquire(self, path: Path) -> None:
        t0, told = time.monotonic(), False
        while not _try_lock(self.fd):
            if not told:
                log.warning("ConvRot: waiting for another process that is building the CUDA kernels in %s%s",
                            self.folder, _holder(path))
                told = True
            if time.monotonic() - t0 > self.wait_s:
                os.close(self.fd)
                self.fd = None
                raise TimeoutError(f"another process{_holder(path)} has held the kernel build lock {path} for more "
                                   f"than {self.wait_s:.0f} s (CONVROT_BUILD_WAIT_S sets the wait)")
            time.sleep(0.2)
        if self.writable:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())  # for the waiting message of the next process

    def __exit__(self, *_):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network mounts): build without one, as torch would
        return True


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def build_key(name: str, deps, cflags, cuda_cflags) -> str:
    """What a library is built from: torch's full version and CUDA, the flags and every source and header byte."""
    h = hashlib.sha256(json.dumps([name, torch.__version__, torch.version.cuda, list(cflags),
                                   list(cuda_cflags)]).encode())
    for d in sorted(str(p) for p in deps):
        h.update(d.encode() + b"\0")
        h.update(Path(d).read_bytes())
    return h.hexdigest()


def _read_stamp(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAMP_NAME).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _write_stamp(folder: Path, key: str) -> None:
    tmp = folder / f"{STAMP_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"key": key, "torch": torch.__version__}))
    os.replace(tmp, folder / STAMP_NAME)


def _wipe(folder: Path) -> None:
    """Remove every build output (objects, library, ninja state) so the next build starts from scratch."""
    for p in folder.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def build_cached(name: str, sources, deps, cflags, cuda_cflags, folder, verbose: bool = False,
                 wait_s: float = BUILD_WAIT_S) -> str:
    """Build (when needed) and load the library `name` from `sources` into `folder`; its path. Raises on failure.

    Under BuildLock: a library whose stamp matches build_key(sources + deps, flags) is loaded as it is (no write,
    so a read-only cache works); otherwise it is built with cpp_extension.load (ninja, incremental) and stamped
    only once it loaded. A process that waited for another's build therefore loads that build only if it
    succeeded for the same sources, never an older library. A cached library that fails to load (truncated by a
    full disk or a kill) is removed with everything built beside it and rebuilt once. cpp_extension's own lock
    file, if a killed build left one, is stale whenever this lock is held (every live builder holds it): removed.
    """
    from torch.utils import cpp_extension

    folder = Path(folder)
    so = folder / f"{name}{cpp_extension.LIB_EXT}"
    key = build_key(name, list(sources) + list(deps), cflags, cuda_cflags)
    with BuildLock(folder, wait_s) as lock:
        if _read_stamp(folder) == key and so.is_file():
            try:
                torch.ops.load_library(str(so))
                return str(so)
            except OSError as e:
                if not lock.writable:
                    raise RuntimeError(f"the cached library {so} cannot be loaded ({_first_line(e)}) and its "
                                       f"folder is read-only") from e
                log.warning("ConvRot: the cached library %s cannot be loaded (%s); rebuilding it", so, _first_line(e))
                _wipe(folder)
        if not lock.writable:
            raise RuntimeError(f"the kernel cache {folder} is read-only and holds no build of these sources")
        stale = folder / TORCH_LOCK_NAME
        if stale.exists():
            log.warning("ConvRot: removing a stale build lock %s (%.0f s old) left by a build that was killed",
                        stale, time.time() - stale.stat().st_mtime)
            stale.unlink(missing_ok=True)
        (folder / STAMP_NAME).unlink(missing_ok=True)  # a failed build must not leave the old stamp standing
        log.warning("ConvRot: compiling %s into %s (first use, or its sources changed; about 1-3 minutes)",
                    name, folder)
        had_outputs = so.exists()
        for attempt in (0, 1):
            # cpp_extension skips the build (and only imports) when it built `name` earlier in this process; the
            # stamp, not its in-process memory, decides here
            versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
            if versioner is not None:
                versioner.entries.pop(name, None)
            try:
                cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=list(cflags),
                                   extra_cuda_cflags=list(cuda_cflags), build_directory=str(folder),
                                   is_python_module=False, verbose=verbose)
                break
            except Exception as e:
                if attempt or not had_outputs:
                    raise
                # ninja thought the old outputs were current, but they do not load or link: start clean
                log.warning("ConvRot: the cached build in %s is damaged (%s); rebuilding from scratch", folder,
                            _first_line(e))
                _wipe(folder)
        _write_stamp(folder, key)
    return str(so)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _register_fakes() -> None:
    """Shape-only kernels so torch.compile / FakeTensor tracing goes through the ops without running them."""

    def rq_fake(x, group_size):
        return x.new_empty((x.shape[0], x.shape[1] // 2), dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    def rq8_fake(x, group_size):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    def unpack_fake(p):
        return p.new_empty((p.shape[0], p.shape[1] * 2), dtype=torch.int8)

    def rq8u_fake(x, group_size, w):
        a, s = rq8_fake(x, group_size)
        return a, s, unpack_fake(w)

    def rq8u_lora_fake(x, group_size, w, h, pmul, q, clamped):
        m, k = x.shape
        r = h.shape[1]
        return (x.new_empty((m, k + r), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
                w.new_empty((w.shape[0], k + r), dtype=torch.int8))

    def gemm_s4_fake(a, a_scale, w, w_scale, bias, out_dtype):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)

    def gemm_i8_fake(a, a_scale, w, w_scale, bias, out_dtype, config=-1):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)

    for name, fn in (("rotate_quantize", rq_fake), ("rotate_quantize_i8", rq8_fake), ("rotate_quantize_q8", rq8_fake),
                     ("unpack_int4", unpack_fake),
                     ("rotate_quantize_i8_unpack", rq8u_fake),
                     ("rotate_quantize_i8_unpack_lora", rq8u_lora_fake),
                     ("gemm_s4_mma", gemm_s4_fake), ("gemm_i8_sm90", gemm_i8_fake)):
        try:
            torch.library.register_fake(f"convrot::{name}")(fn)
        except RuntimeError as e:  # already registered (a second load in the same process)
            if "already" not in str(e):
                raise


def load(verbose: bool = False):
    """Build (first time) and load the extension for the current GPU; the `torch.ops.convrot` namespace or None."""
    if _state["tried"]:
        return _state["ops"]
    with _lock:
        if _state["tried"]:
            return _state["ops"]
        try:
            _state["ops"] = _load(verbose)
        except Exception as e:  # a build failure must never take inference down
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _state["ops"] = _not_available(f"build or load failed ({type(e).__name__}: {first[:300]})")
        _state["tried"] = True
        return _state["ops"]


def _load(verbose: bool):
    if os.environ.get("CONVROT_DISABLE_KERNELS", "0") not in ("", "0"):
        return _not_available("disabled by CONVROT_DISABLE_KERNELS")
    if not torch.cuda.is_available():
        return _not_available("no CUDA device visible to PyTorch")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return _not_available("nvcc not found (set CUDA_HOME to a CUDA toolkit matching PyTorch's CUDA)")
    cc = torch.cuda.get_device_capability()
    if cc not in SUPPORTED_CC:
        return _not_available(f"GPU architecture sm_{cc[0]}{cc[1]} has no kernel here (supported: sm_80/86/87/89/90)")
    cutlass_dirs = cutlass_include_dirs() if cc == (9, 0) else None
    if cc == (9, 0) and cutlass_dirs is None:
        return _not_available("sm_90 GEMM needs the CUTLASS headers: pip install nvidia-cutlass==4.2.0.0 "
                              "(or set CONVROT_CUTLASS_DIR to a CUTLASS checkout)")
    sources, nvcc, cxx = build_flags(cc, cutlass_dirs)
    headers = sorted(str(p) for p in CSRC.iterdir() if p.suffix in (".h", ".cuh"))
    build_cached(f"convrot_kernels_sm{cc[0]}{cc[1]}", sources, headers, cxx, nvcc, _cache_dir(cc), verbose)
    _register_fakes()
    _state["cc"] = cc
    log.info("ConvRot: CUDA kernels loaded for sm_%d%d", cc[0], cc[1])
    return torch.ops.convrot


def unavailable_reason() -> str | None:
    return _state["reason"]


_device_ok: dict[int, bool] = {}


def available(device=None) -> bool:
    """True when the kernels can run on `device` (a torch.device, index or tensor device); never raises."""
    try:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device) if not isinstance(device, torch.device) else device
        if device.type != "cuda":
            return False
        if load() is None:
            return False
        # asked once per device: this runs on every quantized linear call, hundreds per sampling step
        index = device.index if device.index is not None else torch.cuda.current_device()
        ok = _device_ok.get(index)
        if ok is None:
            ok = _device_ok[index] = torch.cuda.get_device_capability(index) == _state["cc"]
        return ok
    except Exception as e:
        log.warning("ConvRot CUDA kernels not available: %s", e)
        return False


def _ops():
    ops = load()
    if ops is None:
        raise RuntimeError(f"ConvRot CUDA kernels are not available: {_state['reason']}")
    return ops


def supports_shape(k: int, n: int | None = None, group_size: int = 256) -> bool:
    """Whether the kernels take this K (and N): K % 64 == 0, K % group_size == 0, K <= 65536, N % 8 == 0."""
    ok = group_size in GROUP_SIZES and k % 64 == 0 and k % group_size == 0 and 0 < k <= MAX_K
    return ok and (n is None or n % 8 == 0)


def _check_act(x2d: torch.Tensor, group_size: int) -> None:
    if x2d.dim() != 2:
        raise ValueError(f"expected a 2-D [M, K] tensor, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {x2d.dtype}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    k = x2d.shape[1]
    if k % 64 or k % group_size or k > MAX_K:
        raise ValueError(f"K={k} must be a multiple of 64 and of group_size={group_size}, and at most {MAX_K}")
    if not x2d.is_contiguous():
        raise ValueError("input must be contiguous")


def _is_sm90() -> bool:
    return _state["cc"] == (9, 0)


def _bias_as(bias, dtype):
    """The kernels read the bias in the output dtype; a layer's bias normally already is (then no copy)."""
    return None if bias is None else bias.to(dtype).contiguous()


def rotate_quantize(x2d: torch.Tensor, group_size: int):
    """(packed int8 [M, K/2], scale float32 [M]) — the reference's rotate_quantize(x2d, G, bits=4). Weights too."""
    _check_act(x2d, group_size)
    return _ops().rotate_quantize(x2d, group_size)


def rotate_quantize_int8_codes(x2d: torch.Tensor, group_size: int):
    """Same codes as rotate_quantize, one int8 per code ([M, K]): what the sm_90 GEMM reads."""
    _check_act(x2d, group_size)
    return _ops().rotate_quantize_i8(x2d, group_size)


def rotate_quantize_q8(x2d: torch.Tensor, group_size: int):
    """(int8 codes [M, K] in [-127, 127], scale fp32 [M]) — the reference's rotate_quantize(x2d, G, bits=8)."""
    _check_act(x2d, group_size)
    return _ops().rotate_quantize_q8(x2d, group_size)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 [N, K/2] -> int8 codes [N, K] on the GPU."""
    return _ops().unpack_int4(packed)


def prepare_weight(w_packed: torch.Tensor) -> torch.Tensor:
    """Opt-in weight cache for the sm_90 route: int8 codes [N, K] (2x the packed size, half of bf16).

    w4a4_linear / w4a4_gemm accept the result in place of the packed weight and then skip the per-call
    sign extension (~19 us for 12288x3072). On other architectures the packed weight is already what the
    GEMM reads, so it is returned unchanged.
    """
    _ops()
    if _is_sm90():
        return unpack_int4(w_packed.contiguous())
    return w_packed


def _weight_int8(w: torch.Tensor, k: int) -> torch.Tensor:
    if w.shape[1] == k:  # prepared (already int8 codes)
        return w
    if w.shape[1] * 2 != k:
        raise ValueError(f"weight has {w.shape[1]} bytes per row; expected {k // 2} (packed) or {k} (prepared)")
    return unpack_int4(w)


def _check_w(w: torch.Tensor, w_scale: torch.Tensor, bias) -> None:
    if w.dtype != torch.int8 or w.dim() != 2 or not w.is_contiguous():
        raise ValueError("weight codes must be a contiguous 2-D int8 tensor")
    if w.shape[0] % 8:
        raise ValueError(f"N={w.shape[0]} must be a multiple of 8")
    if w_scale.numel() != w.shape[0]:
        raise ValueError(f"w_scale has {w_scale.numel()} entries for N={w.shape[0]}")
    if bias is not None and bias.numel() != w.shape[0]:
        raise ValueError(f"bias has {bias.numel()} entries for N={w.shape[0]}")


def w4a4_gemm(a_packed, a_scale, w_packed, w_scale, bias, out_dtype, config: int = -1):
    """acc = exact int32 sum of code products; out = acc * a_scale[m] * w_scale[n] + bias[n] in out_dtype.

    out_dtype may also be float32, which with unit scales returns the accumulator exactly (|acc| < 2^24).
    """
    ops = _ops()
    k = a_packed.shape[1] * 2
    _check_w(w_packed, w_scale, bias)
    if k % 64:
        raise ValueError(f"K={k} must be a multiple of 64")
    a_scale = a_scale.to(torch.float32).contiguous()
    w_scale = w_scale.to(torch.float32).contiguous()
    if _is_sm90():
        return ops.gemm_i8_sm90(unpack_int4(a_packed.contiguous()), a_scale, _weight_int8(w_packed, k), w_scale,
                                _bias_as(bias, out_dtype), out_dtype, config)
    return ops.gemm_s4_mma(a_packed.contiguous(), a_scale, w_packed, w_scale, _bias_as(bias, out_dtype), out_dtype)


def gemm_s4_mma(a_packed, a_scale, w_packed, w_scale, bias, out_dtype):
    """The mma.sync s4 GEMM on any sm_80+ GPU (emulated, slow on sm_90): for tests."""
    return _ops().gemm_s4_mma(a_packed.contiguous(), a_scale.float().contiguous(), w_packed,
                              w_scale.float().contiguous(), _bias_as(bias, out_dtype), out_dtype)


def gemm_int32(a_packed: torch.Tensor, w_packed: torch.Tensor, route: str | None = None, config: int = -1):
    """Test-only: the exact int32 accumulator of the GEMM route ('sm90' or 's4'; default: this GPU's route)."""
    m, n = a_packed.shape[0], w_packed.shape[0]
    ones_m = torch.ones(m, device=a_packed.device, dtype=torch.float32)
    ones_n = torch.ones(n, device=a_packed.device, dtype=torch.float32)
    route = route or ("sm90" if _is_sm90() else "s4")
    if route == "sm90":
        k = a_packed.shape[1] * 2
        out = _ops().gemm_i8_sm90(unpack_int4(a_packed.contiguous()), ones_m, _weight_int8(w_packed, k), ones_n,
                                  None, torch.float32, config)
    else:
        out = gemm_s4_mma(a_packed, ones_m, w_packed, ones_n, None, torch.float32)
    return out.to(torch.int32)


def _linear_args(name: str, x2d, w, w_scale, bias, group_size: int):
    """The checks both whole-linear entry points make: (ops, K, w_scale as contiguous fp32)."""
    ops = _ops()
    _check_act(x2d, group_size)
    if x2d.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name} returns x's dtype, which must be bfloat16 or float16, got {x2d.dtype}")
    _check_w(w, w_scale, bias)
    return ops, x2d.shape[1], w_scale.to(torch.float32).contiguous()


def w4a4_linear(x2d: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, bias, group_size: int,
                config: int = -1) -> torch.Tensor:
    """The whole linear: rotate + quantize x per token, W4A4 GEMM, epilogue; output dtype = x dtype.

    w_packed may be the packed int8 [N, K/2] checkpoint tensor or the result of prepare_weight.
    """
    ops, k, w_scale = _linear_args("w4a4_linear", x2d, w_packed, w_scale, bias, group_size)
    bias = _bias_as(bias, x2d.dtype)
    if _is_sm90():
        if w_packed.shape[1] == k:  # prepared int8 weight
            a8, a_scale = ops.rotate_quantize_i8(x2d, group_size)
            w8 = w_packed
        elif w_packed.shape[1] * 2 == k:
            # One launch quantizes the activations and sign-extends the packed weight to an int8 scratch.
            a8, a_scale, w8 = ops.rotate_quantize_i8_unpack(x2d, group_size, w_packed)
        else:
            raise ValueError(f"weight has {w_packed.shape[1]} bytes per row; expected {k // 2} (packed) or {k} (prepared)")
        return ops.gemm_i8_sm90(a8, a_scale, w8, w_scale, bias, x2d.dtype, config)
    if w_packed.shape[1] * 2 != k:
        raise ValueError(f"weight has {w_packed.shape[1]} bytes per row; expected {k // 2}")
    a4, a_scale = ops.rotate_quantize(x2d, group_size)
    return ops.gemm_s4_mma(a4, a_scale, w_packed, w_scale, bias, x2d.dtype)


def w8a8_linear(x2d: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias, group_size: int,
                config: int = -1) -> torch.Tensor:
    """W8A8 ConvRot linear: the same rotation, int8 codes in [-127, 127] per token, the same 8-bit GEMM.

    sm_90 runs the CUTLASS GEMM with its fused epilogue; sm_80/86/89 run cuBLAS int8 (torch._int_mm), which
    wants M > 16, so tiny batches are padded with zero rows, and apply the scales after it.
    """
    ops, k, w_scale = _linear_args("w8a8_linear", x2d, w8, w_scale, bias, group_size)
    if w8.shape[1] != k:
        raise ValueError(f"W8A8 weight has {w8.shape[1]} codes per row; expected K={k}")
    a8, a_scale = ops.rotate_quantize_q8(x2d, group_size)
    if _is_sm90():
        return ops.gemm_i8_sm90(a8, a_scale, w8, w_scale, _bias_as(bias, x2d.dtype), x2d.dtype, config)
    from ..ops import int8_mm
    return int8_mm(a8, a_scale, w8, w_scale, bias, x2d.dtype)


def linear_fn(group_size: int, bits: int):
    """The whole linear as direct op calls, for convrot.ops.fast_linear_fn (which has checked device and shape).

    Same meaning as w4a4_linear / w8a8_linear with the per-call Python checks left to the C++ ops.
    """
    ops = _ops()
    g = group_size
    if bits == 4 and _is_sm90():
        rq, gemm = ops.rotate_quantize_i8_unpack.default, ops.gemm_i8_sm90.default

        def f(x, w, w_scale, bias):
            a8, a_scale, w8 = rq(x, g, w)
            return gemm(a8, a_scale, w8, w_scale, bias, x.dtype, -1)
    elif bits == 4:
        rq, gemm = ops.rotate_quantize.default, ops.gemm_s4_mma.default

        def f(x, w, w_scale, bias):
            a4, a_scale = rq(x, g)
            return gemm(a4, a_scale, w, w_scale, bias, x.dtype)
    elif _is_sm90():
        rq, gemm = ops.rotate_quantize_q8.default, ops.gemm_i8_sm90.default

        def f(x, w, w_scale, bias):
            a8, a_scale = rq(x, g)
            return gemm(a8, a_scale, w, w_scale, bias, x.dtype, -1)
    else:
        from ..ops import int8_mm
        rq = ops.rotate_quantize_q8.default

        def f(x, w, w_scale, bias):
            a8, a_scale = rq(x, g)
            return int8_mm(a8, a_scale, w, w_scale, bias, x.dtype)
    return f


def can_fold_lowrank() -> bool:
    """LoRA branches fold into the GEMM on the sm_90 route (int8 operands with room for the appended codes)."""
    return load() is not None and _is_sm90()


def w4a4_lowrank_linear(x2d: torch.Tensor, w_packed: torch.Tensor, bias, group_size: int, codes) -> torch.Tensor:
    """W4A4 linear plus a LoRA branch folded into the GEMM's K (convrot.lowrank explains the arithmetic).

    x2d contiguous bf16/fp16 [M, K]; w_packed the layer's packed [N, K/2]; codes a convrot.lowrank.LowRankCodes on
    x's device with `down` in x's dtype. The C++ op checks shapes, dtypes and devices.
    """
    ops = _ops()
    h = x2d @ codes.down.t()  # [M, R]: the only extra pass over x
    a, a_scale, w = ops.rotate_quantize_i8_unpack_lora.default(x2d, group_size, w_packed, h, codes.pmul, codes.q,
                                                               codes.clamped)
    return ops.gemm_i8_sm90.default(a, a_scale, w, codes.w_scale, bias, x2d.dtype, -1)
