"""Peak tensor memory (runtime/memory.py): hand-counted storages."""

import torch

from remesh.runtime.memory import PeakTensorMemory

MiB = 2**20


def test_peak_counts_live_storages_once_and_releases_them():
    before = torch.zeros(MiB // 4)  # alive at entry: counted in live, not in the window's growth
    with PeakTensorMemory() as m:
        base = m.live
        assert base >= MiB
        b = torch.ones(2 * MiB // 4)
        view = b[:10]  # a view shares its storage: not counted again
        del b
        assert m.live - base == 2 * MiB  # the view keeps the storage alive
        del view
        assert m.live == base and m.peak - base == 2 * MiB
        m.reset_peak()
        with torch.inference_mode():
            out = torch.ones(MiB // 4) * 2  # a 1 MiB temporary and the 1 MiB result
        assert m.live - base == MiB and m.peak - base == 2 * MiB
        x = torch.randn(256, 256, requires_grad=True)  # 256 KiB
        (x * 3).sum().backward()
        assert x.grad is not None and m.live - base == MiB + 2 * 256 * 1024
    assert m.max_peak - base == 2 * MiB  # the largest window: the grad step stayed below it
    del before, out
