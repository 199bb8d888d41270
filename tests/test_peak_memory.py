"""peak_memory_gb on the CPU reads ru_maxrss in the platform's unit: KiB on Linux, bytes on macOS."""

from __future__ import annotations

import resource
import sys
from types import SimpleNamespace

import pytest


@pytest.mark.parametrize("platform, maxrss", [("linux", 1_500_000), ("darwin", 1_500_000_000)])
def test_peak_memory_is_gigabytes_on_linux_and_macos(monkeypatch, platform, maxrss):
    import torch

    from wonderland.backends.torch_peft.backend import peak_memory_gb

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=maxrss))
    assert peak_memory_gb(torch.device("cpu")) == pytest.approx(1.5)
