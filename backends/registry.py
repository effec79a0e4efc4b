"""Backend names and where they live. A backend's module is imported only when it is chosen,
so a missing optional library never breaks the others.

Probes that import native libraries run in a child process (``probe_isolated``): a crash or
an abort inside a native library then costs that probe, not ``bench``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from backends.base import Backend, Probe
from model.errors import InputError

BACKENDS: dict[str, str] = {
    "eager": "backends.eager:EagerBackend",
    "mkl": "backends.mkl:MKLBackend",
    "ipex": "backends.ipex:IPEXBackend",
    "cuda": "backends.cuda:CUDABackend",
    "onnxruntime": "backends.onnxruntime:ONNXRuntimeBackend",
    "openvino": "backends.openvino:OpenVINOBackend",
    "int8": "backends.int8:Int8Backend",
    "compile": "backends.compile:CompileBackend",
    # Peers: what a user would run instead, on the same weights (``Backend.peer``).
    "hf": "backends.hf:HFBackend",
    "optimum-onnxruntime": "backends.optimum_onnxruntime:OptimumORTBackend",
    "optimum-openvino": "backends.optimum_openvino:OptimumOVBackend",
    "onnxruntime-genai": "backends.onnxruntime_genai:ORTGenAIBackend",
    "openvino-genai": "backends.openvino_genai:OpenVINOGenAIBackend",
    "ctranslate2": "backends.ctranslate2:CTranslate2Backend",
    "llamacpp": "backends.llamacpp:LlamaCppBackend",
}


class UnknownBackend(InputError):
    """A backend name the registry does not know; the message lists the valid ones."""


def names() -> list[str]:
    return list(BACKENDS)


def get_backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def is_peer(name: str) -> bool:
    """Whether ``name`` is a peer (``Backend.peer``): what a user would run instead of our adapters.
    An adapter that cannot be imported is not known to be one."""
    try:
        return bool(get_backend_class(name).peer)
    except UnknownBackend:
        raise
    except Exception:
        return False


def create(name: str, **kwargs) -> Backend:
    return get_backend_class(name)(**kwargs)


def probe(name: str) -> Probe:
    """Probe in this process. A backend whose module fails to import is reported, not raised."""
    try:
        cls = get_backend_class(name)
    except UnknownBackend:
        raise
    except Exception as e:  # an adapter that cannot even be imported is unavailable, with the reason
        return Probe(False, reason=f"cannot import the adapter: {type(e).__name__}: {e}")
    try:
        return cls.probe()
    except Exception as e:
        return Probe(False, reason=f"probe raised {type(e).__name__}: {e}")


def probe_isolated(name: str, timeout: float = 180.0) -> Probe:
    """Probe in a child process, so a native crash is a reason rather than the end of ``bench``."""
    if name not in BACKENDS:
        raise UnknownBackend(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    cmd = [sys.executable, "-m", "backends.registry", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Probe(False, reason=f"probe did not finish within {timeout:.0f} s")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        return Probe(False, reason=f"probe process died ({how}): {tail}")
    try:
        return Probe.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, KeyError) as e:
        return Probe(False, reason=f"probe printed no result ({e})")


def probe_all(isolated: bool = True, names: list[str] | None = None) -> dict[str, Probe]:
    """Every registered backend's probe (or those of ``names``), run side by side."""
    fn = probe_isolated if isolated else probe
    names = list(BACKENDS) if names is None else list(names)
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(fn, names)))


if __name__ == "__main__":  # the child side of probe_isolated
    print(json.dumps(probe(sys.argv[1]).to_dict()))
