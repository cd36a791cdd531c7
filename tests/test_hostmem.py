"""Freed host memory is reused by the next pass instead of being page-faulted in again."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's")

# A pass allocates activations of a few MiB and frees them all; count the page faults of ten such passes.
_PASSES = """
import resource, sys, torch
from service.hostmem import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def a_pass():
    activations = [torch.ones(n * 2**18) for n in (12, 12, 6, 6, 3, 3, 24, 8)]  # 3 to 24 MiB
    del activations
a_pass(); a_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a_pass()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_pass(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PASSES, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout)


def test_passes_stop_page_faulting_once_freed_memory_is_retained():
    default, retained = _faults_per_pass("default"), _faults_per_pass("retain")
    assert default > 50  # glibc hands some of the freed activations back to the kernel every pass
    assert retained < default / 10
