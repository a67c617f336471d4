"""The allocator settings keep freed blocks: a large tensor allocated where a larger
one was freed touches no new pages. Each case runs in its own process, since the setting
is process-wide."""

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
from zoomnet.runtime.allocator import reuse_freed_memory
applied = reuse_freed_memory()
torch.empty(16 << 20).fill_(1.0)  # 64 MB, above any mmap threshold glibc picks by itself
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(15 << 20).fill_(1.0)  # 60 MB: fits the freed block (one of the same size may not: alignment)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str | None, program: str = _PROGRAM) -> tuple[str, int]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ZOOMNET_MALLOC", None)
    if setting is not None:
        env["ZOOMNET_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_freed_blocks_are_reused_where_asked_and_only_there():
    pages = (60 << 20) // os.sysconf("SC_PAGE_SIZE")  # 15,360 with 4 KB pages
    if pages < 10_000:
        pytest.skip("pages this large leave too few faults to tell the two cases apart")
    applied, faults = _faults("1")
    assert applied == "True"
    assert faults < 1_000  # in the block the first tensor left: no new pages
    for setting in (None, "0"):  # the default leaves glibc's allocator as it comes
        applied, faults = _faults(setting)
        assert applied == "False"
        assert faults > 0.9 * pages  # mapped afresh, page by page


_STEADY_PROGRAM = """
import resource, torch
from zoomnet.runtime.allocator import settle_heap
applied = settle_heap()
torch.empty(5 << 20).fill_(1.0)  # 20 MB: mapped afresh by glibc as it comes, from the heap when settled
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(19 << 18).fill_(1.0)  # 19 MB, in the freed block
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_steady_thresholds_keep_blocks_below_32_mb_for_the_next_call():
    """What every command sets (zoomnet.runtime.allocator.settle_heap): a freed block of 20 MB
    serves the next call without new pages; ZOOMNET_MALLOC=0 leaves glibc as it comes."""
    pages = (19 << 20) // os.sysconf("SC_PAGE_SIZE")  # 4,864 with 4 KB pages
    if pages < 3_000:
        pytest.skip("pages this large leave too few faults to tell the two cases apart")
    applied, faults = _faults(None, _STEADY_PROGRAM)
    assert applied == "True" and faults < 500
    applied, faults = _faults("0", _STEADY_PROGRAM)
    assert applied == "False" and faults > 0.9 * pages
