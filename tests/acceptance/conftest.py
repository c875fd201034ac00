"""The battery under pytest: the shared inputs are built once per session, each case runs in its own folder
under them, and the session ends with the battery's table."""
from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .runner import Ctx, Outcome, SetupError, Slot, build_base, case_dir, describe, new_ctx, run_case, table

HERE = Path(__file__).resolve().parent


@dataclass
class Ledger:
    """This session's case folders and outcomes (the table at the end counts them)."""
    outcomes: list[Outcome] = field(default_factory=list)
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))


LEDGER = pytest.StashKey[Ledger]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every battery test `acceptance` (pyproject describes the marker)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.acceptance)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The battery's table for the cases this session ran (pytest orders the categories by module name)."""
    outcomes = config.stash.get(LEDGER, Ledger()).outcomes
    if outcomes:
        terminalreporter.write_sep("=", "acceptance battery")
        terminalreporter.write_line(table(outcomes))


@pytest.fixture(scope="session")
def acceptance_ctx(tmp_path_factory: pytest.TempPathFactory) -> Ctx:
    """The shared inputs every case reads: data, two tiny runs, artifacts, a .mdz (about half a minute)."""
    ctx = new_ctx(tmp_path_factory.mktemp("acceptance"))
    try:
        build_base(ctx)
    except SetupError as e:
        pytest.fail(str(e), pytrace=False)
    return ctx


@pytest.fixture
def run_slot(acceptance_ctx: Ctx, request: pytest.FixtureRequest) -> Callable[[Slot], None]:
    """Run a slot's case and assert it passed. A passing case's folder is removed; a failing one stays for a
    look (under pytest's basetemp, which keeps the last three sessions)."""
    ledger = request.config.stash.setdefault(LEDGER, Ledger())

    def run(slot: Slot) -> None:
        index = next(ledger.numbers)
        outcome = run_case(acceptance_ctx, slot.make(acceptance_ctx), index)
        ledger.outcomes.append(outcome)
        if outcome.skipped:
            pytest.skip(outcome.skipped)
        if not outcome.passed:
            pytest.fail(describe(outcome), pytrace=False)  # the case's own report: no traceback of this helper
        shutil.rmtree(case_dir(acceptance_ctx, index), ignore_errors=True)
    return run
