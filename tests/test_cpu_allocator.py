import platform
import subprocess
import sys

import pytest

from loupe_hf.cpu_allocator import LARGEST_MMAP_THRESHOLD, NO_TRIMMING, keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A step's worth of 4 MB intermediates, all freed at its end. With glibc's defaults they are either
# mapped afresh each time or, once the dynamic thresholds have grown, the free top of the heap
# (80 MB) exceeds the trim threshold (at most 64 MB) and is returned to the kernel: either way the
# next round faults its pages back in.
CHURN = """
import resource, sys, torch
from loupe_hf.cpu_allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
for index in range(15):
    if index == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    intermediates = [torch.ones(1 << 20) for _ in range(20)]
    del intermediates
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHURN, setting], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory only changes glibc's malloc")
def test_keeping_freed_memory_stops_page_faults_of_repeated_intermediates():
    # With glibc's defaults some processes happen not to trim (2 of 8 runs here): the churn must
    # fault in at least one of several fresh processes, and never with the setting.
    default = [_faults("default")]
    while default[-1] <= 50_000 and len(default) < 8:
        default.append(_faults("default"))
    assert max(default) > 50_000, default  # about 10 rounds x 20,480 pages of 4 kB
    assert _faults("tuned") < 100


def test_keep_freed_memory_reports_whether_it_applied():
    assert keep_freed_memory() is GLIBC


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"mmap_threshold": 0}, "mmap_threshold"),
        ({"mmap_threshold": LARGEST_MMAP_THRESHOLD + 1}, "mmap_threshold"),
        ({"trim_threshold": -5}, "trim_threshold"),
        ({"trim_threshold": NO_TRIMMING + 1}, "trim_threshold"),
    ],
)
def test_bad_thresholds_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        keep_freed_memory(**arguments)
