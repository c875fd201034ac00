"""Acceptance battery, category "download" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .runner import Case, Slot, fixed, slot_id


def download_cases() -> list[Slot]:
    """download without a reachable Hub: one line naming the endpoint, nothing left half-written."""
    dl = ("download", "--train-shards", "1", "--out", "{C}/dl", "--quiet")
    return fixed([
        Case("download", "endpoint refuses connections", dl, names="127.0.0.1"),
        Case("download", "HF_HUB_OFFLINE=1", dl, names="offline", env=(("HF_HUB_OFFLINE", "1"),)),
        Case("download", "endpoint not a URL", dl, names="not-a-url", env=(("HF_ENDPOINT", "not-a-url"),)),
        Case("download", "endpoint answers 404", dl, names="{HTTP}/missing",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
        Case("download", "endpoint answers junk (not a Hub)", dl, names="{HTTP}/garbage",
             env=(("HF_ENDPOINT", "{HTTP}/garbage"),)),
        Case("download", "--repo-id nonsense", (*dl, "--repo-id", "no/such/repo//x"), names="no/such/repo//x",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
        Case("download", "--variant with a path", (*dl, "--variant", "../../etc"), names="",
             env=(("HF_ENDPOINT", "{HTTP}/missing"),)),
    ])


@pytest.mark.parametrize("slot", download_cases(), ids=slot_id)
def test_download(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
