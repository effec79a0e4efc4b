import copy
import subprocess
import sys

import pytest

from bench.machine import environment as machine
from bench.machine.environment import ISA_FLAGS, THREAD_ENV, diff_fingerprints, fingerprint, fingerprint_id


@pytest.fixture(scope="module")
def fp():
    return fingerprint()


def test_fingerprint_has_the_fields(fp):
    assert set(fp) == {"cpu", "memory_gb", "os", "kernel", "python", "versions", "thread_env", "git_commit", "gpus"}
    cpu = fp["cpu"]
    for key in ("brand", "arch", "flags", "isa", "cores_physical", "cores_logical", "freq_mhz"):
        assert key in cpu
    assert cpu["flags"] == sorted(cpu["flags"])
    assert set(cpu["isa"]) == set(ISA_FLAGS)
    assert all(cpu["isa"][f] == (f in cpu["flags"]) for f in ISA_FLAGS)
    assert cpu["cores_logical"] >= 1 and fp["memory_gb"] > 0
    assert set(fp["thread_env"]) == set(THREAD_ENV)
    assert set(fp["versions"]) >= {"torch", "onnxruntime", "openvino", "numpy"}
    assert fp["versions"]["numpy"] is not None  # installed with the project
    assert isinstance(fp["gpus"], list)


def test_fingerprint_does_not_import_heavy_libraries():
    code = ("import sys; from bench.machine.environment import fingerprint; fingerprint(); "
            "print(sorted(m for m in ('torch', 'openvino', 'onnxruntime', 'nncf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=machine.REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_fingerprint_is_stable(fp):
    again = fingerprint()
    assert fingerprint_id(again) == fingerprint_id(fp)
    assert len(fingerprint_id(fp)) == 12


def test_thread_env_is_recorded_and_changes_the_id(fp, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pinned = fingerprint()
    assert pinned["thread_env"]["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert fingerprint_id(fingerprint()) != fingerprint_id(pinned)


def test_id_changes_with_a_version_and_diff_names_it(fp):
    other = copy.deepcopy(fp)
    other["versions"]["torch"] = "9.9.9"
    assert fingerprint_id(other) != fingerprint_id(fp)
    lines = diff_fingerprints(fp, other)
    assert lines == [f"versions.torch: {fp['versions']['torch']} -> 9.9.9"]


def test_id_ignores_commit_and_clock(fp):
    other = copy.deepcopy(fp)
    other["git_commit"] = "abcdef0-dirty"
    other["cpu"]["freq_mhz"] = 1.0
    assert fingerprint_id(other) == fingerprint_id(fp)
    assert diff_fingerprints(fp, other) == []
    assert sorted(diff_fingerprints(fp, other, all_fields=True)) == sorted([
        f"cpu.freq_mhz: {fp['cpu']['freq_mhz']} -> 1.0",
        f"git_commit: {fp['git_commit']} -> abcdef0-dirty",
    ])


def test_diff_of_flags_shows_added_and_removed(fp):
    other = copy.deepcopy(fp)
    dropped = fp["cpu"]["flags"][0]
    other["cpu"]["flags"] = sorted(set(fp["cpu"]["flags"]) - {dropped} | {"zz_new_flag"})
    other["gpus"] = [{"name": "NVIDIA H100", "memory_gb": 80.0, "driver": "550.1"}]
    lines = diff_fingerprints(fp, other)
    assert f"cpu.flags: +zz_new_flag, -{dropped}" in lines
    assert any(line.startswith("gpus: [") for line in lines)
    assert fingerprint_id(other) != fingerprint_id(fp)


def test_git_commit_outside_git_is_none(tmp_path):
    assert machine.git_commit(tmp_path) is None


def _affinity(monkeypatch, cpus):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(cpus))


def test_all_threads_is_one_per_physical_core_this_process_may_use(monkeypatch, tmp_path):
    """'all' used to count logical CPUs, two threads per core on a machine with hyper-threads."""
    for cpu in range(8):  # 4 cores of 2 hyper-threads: cpu i and i + 4 share a core
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    monkeypatch.setattr(machine, "SYSFS_CPU", tmp_path)
    _affinity(monkeypatch, range(8))
    assert machine.all_threads() == 4
    _affinity(monkeypatch, {0, 4})  # both hyper-threads of one core (a cgroup cpuset)
    assert machine.all_threads() == 1
    _affinity(monkeypatch, {0, 1, 2})
    assert machine.all_threads() == 3


def test_all_threads_without_a_topology_is_psutils_physical_count_capped_by_affinity(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "SYSFS_CPU", tmp_path / "absent")
    monkeypatch.setattr(machine.psutil, "cpu_count", lambda logical=True: 8 if logical else 4)
    _affinity(monkeypatch, range(8))
    assert machine.all_threads() == 4
    _affinity(monkeypatch, {0, 1})
    assert machine.all_threads() == 2
    monkeypatch.setattr(machine.psutil, "cpu_count", lambda logical=True: 8 if logical else None)
    _affinity(monkeypatch, range(6))
    assert machine.all_threads() == 6  # psutil cannot tell: every logical CPU allowed


def test_the_fingerprint_records_physical_logical_and_allowed_cores(fp):
    cpu = fp["cpu"]
    assert 1 <= cpu["cores_allowed"] <= cpu["cores_logical"]
    assert cpu["cores_physical"] is None or 1 <= cpu["cores_physical"] <= cpu["cores_logical"]
