"""Process-level performance settings of transferlab.runtime."""

import os
import subprocess
import sys

import pytest

from transferlab.runtime import keep_freed_memory

# Five forward passes of two convolutions on a 77 MB activation, after one warm-up pass; prints the
# page faults they caused. Run in a fresh process each time, as the allocator setting is process-wide.
FORWARDS = """
import resource, torch
from transferlab.runtime import prepare_model
net = prepare_model(torch.nn.Sequential(torch.nn.Conv2d(32, 96, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(96, 32, 1)), torch.device("cpu"))
x = torch.randn(16, 32, 112, 112).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(**env: str) -> int:
    out = subprocess.run([sys.executable, "-c", FORWARDS], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings exist on Linux only")
def test_forward_passes_reuse_freed_memory_instead_of_faulting_it_in_again():
    kept, default = _page_faults(), _page_faults(TRANSFERLAB_NO_MALLOPT="1")
    assert default > 50_000  # each pass maps its activations afresh: ~190,000 faults measured
    assert kept < default / 5


def test_allocator_setting_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_NO_MALLOPT", "1")
    assert keep_freed_memory.__wrapped__() is False
