"""On CPU a training process keeps freed memory for reuse (`megahf.training.cpu_malloc`): a large tensor comes from
the heap instead of a fresh mmap, the choice can be turned off, and a bad value is refused naming the fix.

The mallopt settings are process-wide, so each check runs in a fresh interpreter; glibc's `mallinfo2` reports how
many bytes are in mmap'ed blocks (`hblkhd`), which is what the setting changes."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from megahf.training import cpu_malloc
from megahf.training.cpu_malloc import ENV_VAR, keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# The module file alone, with only the light `megahf.errors` it imports (not torch, not `megahf.training`: a fresh
# interpreter in a fraction of a second), and a plain malloc, which is what a CPU tensor's storage is.
PROBE = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("megahf.training.cpu_malloc", sys.argv[1])
cpu_malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cpu_malloc)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
print("said:", cpu_malloc.keep_freed_memory())
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)
print("mmapped:", libc.mallinfo2().hblkhd - before)
"""


def probe(env_value: str | None, monkeypatch) -> tuple[str, int]:
    if env_value is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env_value)
    out = subprocess.run([sys.executable, "-c", PROBE, cpu_malloc.__file__], capture_output=True, text=True,
                         check=True).stdout
    said = out.split("said: ")[1].split("\n")[0]
    return said, int(out.split("mmapped: ")[1].split()[0])


def test_by_default_a_large_block_comes_from_the_heap(monkeypatch):
    said, mmapped = probe(None, monkeypatch)
    if said == "None":  # only where mallopt refused the values (the module returns None then): glibc's defaults
        pytest.skip("this glibc refuses a 1 GiB mmap threshold")
    assert "kept for reuse" in said and f"{ENV_VAR}=system" in said
    assert mmapped == 0


def test_system_keeps_glibcs_default(monkeypatch):
    said, mmapped = probe("system", monkeypatch)
    assert said == "None"
    assert mmapped >= 64 << 20  # the control: without the setting the same block is an mmap of its own


def test_a_bad_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "jemalloc")
    with pytest.raises(cpu_malloc.MallocSettingError, match=f"{ENV_VAR}='jemalloc': use 'keep' .* or 'system'"):
        keep_freed_memory()


def test_a_cpu_training_process_applies_it_and_says_so(monkeypatch, capsys):
    """`prepare_processes`, which every pretrain and finetune run calls first, applies it on CPU and logs the line."""
    from megahf.parallel.layout import resolve_layout
    from megahf.training import processes

    calls = []
    monkeypatch.setattr(processes, "keep_freed_memory", lambda: calls.append(1) or "CPU memory: kept")
    monkeypatch.setattr(processes.torch.cuda, "is_available", lambda: False)
    processes.prepare_processes(resolve_layout(world_size=1))
    assert calls == [1] and "[megahf] CPU memory: kept" in capsys.readouterr().out
