"""`common.allocator.keep_freed_memory`: a cohort node reuses the memory its steps free instead of faulting it in
again. Run in a child process: the setting is process-wide and cannot be undone."""

import ctypes.util
import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys
import torch
from fedpa.common.allocator import keep_freed_memory

def faults_over_steps(steps=20):
    # the engine's pattern: a few activations of 8 MB written at every step, freed before the next one
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        held = [torch.empty(2 * 1024 * 1024).fill_(1.0) for _ in range(3)]
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

faults_over_steps(2)
applied = keep_freed_memory()
faults_over_steps(3)   # the first steps after the change grow the heap once
print(json.dumps({"applied": applied, "again": keep_freed_memory(), "faults": faults_over_steps()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
                    reason="glibc's malloc only")
def test_freed_activations_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] and result["again"]
    # 20 steps x 24 MB written would be 122,880 pages if each step's memory were faulted in afresh
    assert result["faults"] < 200, result

