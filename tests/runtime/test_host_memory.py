"""A forward's large temporaries reuse freed memory instead of faulting in fresh pages."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from adapterhub.runtime.host_memory import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc's")
def test_a_freed_3_mib_activation_is_reused_without_page_faults() -> None:
    assert keep_freed_memory()

    def activation() -> None:
        torch.ones(304, 2560).sum()  # 3 MiB, a prefill's MLP activation; freed at once

    activation()  # the first one maps its pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        activation()
    # Unmapped on free, each of the 20 would fault in its 768 pages again.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 768
