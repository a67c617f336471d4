"""The allocator setting keeps freed blocks: allocating the same large tensor again touches
no new pages. Each case runs in its own process, since the setting is process-wide."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

_PROGRAM = """
import resource, torch
from zoomnet.allocator import reuse_freed_memory
applied = reuse_freed_memory()
torch.empty(16 << 20).fill_(1.0)  # 64 MB, above any mmap threshold glibc picks by itself
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> tuple[str, int]:
    env = dict(os.environ, ZOOMNET_MALLOC=setting, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_blocks_are_reused_and_the_setting_can_be_turned_off():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # 16,384 with 4 KB pages
    if pages < 10_000:
        pytest.skip("pages this large leave too few faults to tell the two cases apart")
    applied, faults = _faults("1")
    assert applied == "True"
    assert faults < 2_000  # five 64 MB tensors in the block the first one left: no new pages
    applied, faults = _faults("0")
    assert applied == "False"
    assert faults > 0.9 * 5 * pages  # each tensor mapped afresh, page by page
