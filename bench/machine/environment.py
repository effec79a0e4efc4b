"""The environment fingerprint: what a result was measured on.

A number without its environment is not a result. Every run stores ``fingerprint()``;
``fingerprint_id()`` hashes the part of it that makes results comparable (CPU and its ISA,
cores, memory, OS, Python, library versions, thread environment, GPUs), so runs measured
on different set-ups are never silently mixed. The git commit and the clock are recorded
but left out of the id: the same machine and libraries give comparable numbers across
commits, and a comparison across commits is the point of keeping them.

Library versions are read from package metadata, so fingerprinting never imports torch,
OpenVINO or the other heavy libraries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import cpuinfo
import psutil

from bench.results.schema import diff_fields

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "fma")

# name in the fingerprint -> distributions that provide it, first installed one wins.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "intel_extension_for_pytorch": ("intel_extension_for_pytorch", "intel-extension-for-pytorch"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "onnx": ("onnx",),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
    "numpy": ("numpy",),
}

# Environment variables that change how the libraries thread, pin, allocate or dispatch.
THREAD_ENV = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
    "KMP_AFFINITY", "KMP_BLOCKTIME", "KMP_HW_SUBSET", "OMP_PROC_BIND", "OMP_PLACES", "OMP_DYNAMIC",
    "MKL_DYNAMIC", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "LD_PRELOAD",
    "MALLOC_CONF", "CUDA_VISIBLE_DEVICES",
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSFS_CPU = Path("/sys/devices/system/cpu")  # Linux's CPU topology


@functools.cache
def _cpu_info() -> dict:
    """py-cpuinfo's answer, once per process: it takes about a second."""
    return cpuinfo.get_cpu_info()


def _allowed_cpus() -> set[int]:
    """The logical CPUs this process may run on (taskset, cgroup cpusets)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(psutil.cpu_count(logical=True) or 1))


def all_threads() -> int:
    """What ``threads = "all"`` means: one thread per physical core this process may run on.

    Hyper-threads share a core's execution units, so a second thread per core rarely speeds
    up matmul-bound work and often slows it. The cores are counted from the kernel's topology
    (CPUs that list the same ``thread_siblings_list`` share a core) among the CPUs this
    process may use; without that topology, psutil's physical count capped by the CPUs
    allowed; where psutil cannot tell either, every logical CPU allowed.
    """
    allowed = _allowed_cpus()
    cores = set()
    try:
        for cpu in allowed:
            cores.add((SYSFS_CPU / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
    except OSError:
        cores = set()
    if cores:
        return len(cores)
    physical = psutil.cpu_count(logical=False)  # None where psutil cannot tell
    return min(physical, len(allowed)) if physical else len(allowed)


def _cpu() -> dict:
    info = _cpu_info()
    flags = sorted(set(info.get("flags", [])))
    freq = psutil.cpu_freq()
    if freq is not None and (freq.max or freq.current):
        freq_mhz = float(freq.max or freq.current)
    else:  # no cpufreq in many VMs: fall back to the advertised clock
        freq_mhz = info.get("hz_advertised", (0, 0))[0] / 1e6 or None
    return {
        "brand": info.get("brand_raw", "unknown"),
        "arch": info.get("arch_string_raw") or platform.machine(),
        "flags": flags,
        "isa": {f: f in flags for f in ISA_FLAGS},
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_allowed": len(_allowed_cpus()),  # logical CPUs this process may run on (taskset, cgroups)
        "freq_mhz": freq_mhz,
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.version()}"


def library_versions() -> dict[str, str | None]:
    """Installed version of each library the tool uses, or None; never imports them."""
    versions: dict[str, str | None] = {}
    for name, dists in LIBRARIES.items():
        versions[name] = None
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            # A differently named build (onnxruntime-gpu) is a different library: say which.
            versions[name] = version if dist.replace("-", "_") == name else f"{version} ({dist})"
            break
    return versions


def git_commit(path: Path = REPO_ROOT) -> str | None:
    """Short commit of the checkout at ``path``, "-dirty" when tracked files have uncommitted
    changes (untracked files do not count); None outside git."""
    if shutil.which("git") is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    dirty = status.returncode == 0 and status.stdout.strip() != ""
    return sha.stdout.strip() + ("-dirty" if dirty else "")


def gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi lists them (no torch import); [] without nvidia-smi or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:  # nvidia-smi present but no driver or device
        return []
    found = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        name, memory_mib, driver = parts
        try:
            memory_gb = round(float(memory_mib) / 1024, 1)
        except ValueError:
            memory_gb = None
        found.append({"name": name, "memory_gb": memory_gb, "driver": driver})
    return found


def fingerprint() -> dict:
    """Everything about this machine and process environment that a result depends on."""
    return {
        "cpu": _cpu(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": library_versions(),
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "git_commit": git_commit(),
        "gpus": gpus(),
    }


def comparable(fp: dict) -> dict:
    """The fields of a fingerprint that must match for two results to be comparable.

    Memory is rounded to whole GiB (the kernel's reservation wobbles); the clock
    frequency, the kernel build and the git commit are left out.
    """
    cpu = fp.get("cpu", {})
    memory = fp.get("memory_gb")
    return {
        "cpu": {k: cpu.get(k) for k in ("brand", "arch", "flags", "cores_physical", "cores_logical",
                                        "cores_allowed")},
        "memory_gb": None if memory is None else round(memory),
        "os": fp.get("os"),
        "python": fp.get("python"),
        "versions": fp.get("versions"),
        "thread_env": fp.get("thread_env"),
        "gpus": [{k: g.get(k) for k in ("name", "memory_gb", "driver")} for g in fp.get("gpus", [])],
    }


def fingerprint_id(fp: dict) -> str:
    """A short hash of ``comparable(fp)``: equal ids mean results may be compared."""
    canonical = json.dumps(comparable(fp), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def diff_fingerprints(a: dict, b: dict, *, all_fields: bool = False) -> list[str]:
    """Lines such as ``versions.torch: 2.8.0 -> 2.9.0``, one per differing field, sorted.

    By default only the comparable fields (the ones behind ``fingerprint_id``) are diffed,
    so the lines explain why two ids differ; ``all_fields=True`` adds the commit, clock, etc.
    Lists of names (CPU flags) show what was added and removed instead of both lists.
    """
    return diff_fields(*((a, b) if all_fields else (comparable(a), comparable(b))))
