"""Acceptance battery, category "roundtrip" (runner.py says how a case is judged)."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from .runner import OK, Case, Slot, fixed, held_out_docs, round_trip_inputs, slot_id


def roundtrip_cases() -> list[Slot]:
    """compress then decompress through the CLI: the same bytes back, whatever they are."""
    texts = round_trip_inputs(held_out_docs())
    cases = [Case("roundtrip", name, (), expect=OK, runner="roundtrip", data=data) for name, data in texts.items()]
    variants = [("--mode", "strict"), ("--order", "confidence"), ("--order", "margin"), ("--tokens-per-pass", "8"),
                ("--passes", "1")]
    picks = ["invalid-utf8", "emoji", "whitespace", "nfkc-changes", next(iter(texts))]
    cases += [Case("roundtrip", f"{name} {' '.join(flags)}", flags, expect=OK, runner="roundtrip",
                   data=texts[name]) for name, flags in zip(picks, variants)]
    return fixed(cases)


@pytest.mark.parametrize("slot", roundtrip_cases(), ids=slot_id)
def test_roundtrip(slot: Slot, run_slot: Callable[[Slot], None]) -> None:
    run_slot(slot)
