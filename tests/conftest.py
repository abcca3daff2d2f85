"""Shared pytest fixtures and the end-of-run note on what did not run.

ComfyUI-specific fixtures live in tests/comfy_env.py (in-process ComfyUI on the CPU). Every skipped test is
collected here and summarized after the run in one paragraph grouped by cause (ComfyUI absent, no GPU, no CUDA
toolkit, no trained weights, other), so a green run that skipped the ComfyUI or GPU tests says so loudly. With
$CONVROT_TEST_SUMMARY set to a file name, the same paragraph is also written there (.ci/run prints it last).
The summary never changes the exit status.
"""
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Triton's interpreter works only if triton.language is first imported with TRITON_INTERPRET=1 (its standard
# functions are bound then). Without CUDA, ComfyUI's comfy-kitchen imports triton long before tests/test_triton.py
# runs, so the switch is set here, before anything imports triton.
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

from comfy_env import comfy  # noqa: E402,F401  (session fixture: ComfyUI + this pack loaded as a custom node)

# (cause, what to do) by the first matching needle in a skip reason (lower case)
_CAUSES = [
    (("comfyui not found",), "ComfyUI absent",
     "to run them, clone this pack into ComfyUI/custom_nodes/ or set COMFYUI_PATH"),
    (("cuda gpu", "no cuda device", "kernels not available", "needs the sm_90 build", "other gpu"), "no CUDA GPU",
     "they run on a machine with an NVIDIA GPU (sm_80/86/89/90)"),
    (("nvcc", "cuda toolkit", "cuda runtime headers", "c++ headers", "no c++ compiler"), "no CUDA toolkit",
     "install the CUDA toolkit (nvcc) or set CUDA_HOME"),
    (("shared/weights",), "no trained FLUX weights",
     "they need a FLUX file under ../shared/weights/"),
    (("sm_120",), "sm_120 did not build",
     "for information only, sm_120 is not a supported target"),
    (("nvidia-cutlass", "cutlass"), "no CUTLASS headers",
     "pip install -r requirements.txt"),
]

_skipped: list[tuple[str, str]] = []  # (nodeid, reason)


def _reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        msg = str(lr[2])
    else:
        msg = str(lr)
    return msg[len("Skipped: "):] if msg.startswith("Skipped: ") else msg


def pytest_collectreport(report):
    if report.skipped:
        _skipped.append((report.nodeid, _reason(report)))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, _reason(report)))


def _cause(reason: str):
    low = reason.lower()
    for needles, cause, hint in _CAUSES:
        if any(n in low for n in needles):
            return cause, hint
    return "other", ""


def skip_summary(skipped, total=None) -> str:
    """One paragraph: how many tests did not run, grouped by cause, with the files they live in."""
    if not skipped:
        return "NOT RUN: nothing. Every collected test ran (none was skipped)."
    groups = defaultdict(list)
    for nodeid, reason in skipped:
        groups[_cause(reason)].append((nodeid, reason))
    parts = []
    for (cause, hint), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        files = Counter(nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid, _ in items)
        where = ", ".join(f"{f} {n}" if n > 1 else f for f, n in files.most_common())
        text = f"{len(items)} skipped, {cause} ({where})"
        if cause == "other":
            reasons = sorted({r.splitlines()[0][:160] for _, r in items})
            text += ": " + "; ".join(reasons[:5]) + ("; ..." if len(reasons) > 5 else "")
        elif hint:
            text += f": {hint}"
        parts.append(text)
    of = f" of {total}" if total else ""
    return (f"NOT RUN: {len(skipped)}{of} tests were skipped, so this run does not cover them. "
            + ". ".join(parts) + ".")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    try:
        stats = terminalreporter.stats
        total = sum(len(stats.get(k, [])) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"))
        text = skip_summary(_skipped, total or None)
        terminalreporter.write_sep("!" if _skipped else "=", "what did not run")
        terminalreporter.write_line(text)
        out = os.environ.get("CONVROT_TEST_SUMMARY")
        if out:
            with open(out, "w") as f:
                f.write(text + "\n")
    except Exception as e:  # the summary is information; it must never fail the run
        terminalreporter.write_line(f"(skip summary unavailable: {type(e).__name__}: {e})")
