"""Run control: when to stop (steps, SIGTERM, Ctrl-C, the wall-clock cap), agreed by every rank at a vote
without a host sync per step; the training clock; and which steps log, validate and checkpoint."""
from __future__ import annotations

import enum
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import Config
from ..dist import all_reduce_sum, dist_backend_needs_device

# the most training seconds between two stop votes (projected): a signal waits at most about this
# long, well inside the ~30 s a scheduler leaves between SIGTERM and SIGKILL
VOTE_SECONDS = 5.0


class StopSignal:
    """SIGTERM or a first Ctrl-C (SIGINT) asks for a checkpoint and a clean exit at the step boundary
    of the next stop vote (RunControl: a log step, or within ~VOTE_SECONDS); a second Ctrl-C aborts at
    once. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self.previous: dict = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.received is not None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name
        if signum == signal.SIGINT:
            try:  # os.write, not print: a handler may interrupt a print to the same stream
                os.write(2, b"\nCtrl-C: stopping within a few steps with a checkpoint "
                            b"(Ctrl-C again aborts without one)\n")
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(signum, handler)


class RunInterrupted(Exception):
    """A run of a race or an ablation stopped by a signal: its checkpoint is written and nothing else (no
    summary, no eval), and rerunning the command resumes it. `signal` is "SIGINT" or "SIGTERM"."""

    def __init__(self, signal_name: str, run_dir):
        super().__init__(f"{signal_name} received; {run_dir}/checkpoint.pt holds the run: rerun the command "
                         f"to resume it")
        self.signal = signal_name


class Stop(enum.Enum):
    """Why training stopped: a signal leaves a checkpoint for --resume, the others finish the run."""
    STEPS = "steps"
    SIGTERM = "SIGTERM"
    SIGINT = "SIGINT"
    WALLCLOCK = "wall-clock cap"

    @property
    def resumable(self) -> bool:
        """Whether the run stops with a checkpoint to resume from rather than finishing."""
        return self in (Stop.SIGTERM, Stop.SIGINT)

    def describe(self, cfg: Config, seconds: float) -> str:
        """The reason, as the log's 'stopped at step' line and the summary give it."""
        return {Stop.STEPS: f"reached {cfg.steps} steps", Stop.SIGTERM: "SIGTERM received",
                Stop.SIGINT: "SIGINT (Ctrl-C) received",
                Stop.WALLCLOCK: f"wall-clock cap of {cfg.max_wallclock:g}s reached after {seconds:.1f}s "
                                f"of training"}[self]


class TrainClock:
    """Training seconds. A read waits for the device first (so it is a host sync: votes only);
    evaluation and checkpoints are taken off the clock."""

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.device, self.start = device, time.perf_counter() - seconds

    def read(self) -> float:
        """Training seconds so far, once the device has caught up."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stands still inside the block."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began


@dataclass(frozen=True)
class Vote:
    """What every rank agreed at a vote: steps done, training seconds (the ranks' mean), and the seconds
    per step since the vote before (None before the first vote)."""
    step: int
    seconds: float
    step_seconds: float | None = None


class RunControl:
    """When to stop, and the training time that keys the lr under --max-wallclock, the same on every
    rank without a host sync per step.

    A vote is one all-reduce read on the host: any rank's SIGTERM or Ctrl-C, any rank past the cap, the
    ranks' mean clock. The loop votes at its log and validation steps; on top of those this plans votes
    from agreed numbers only (so every rank votes at the same steps): at least every VOTE_SECONDS, which
    bounds how late a signal is noticed, and under --max-wallclock half way to the projected cap each
    time, so the last votes fall on every step and a capped run stops at the first step boundary past
    the cap, give or take a step if the step time jumps. Between votes every rank takes its training time
    as the last agreed time + steps since x agreed seconds per step, so all ranks set the same lr.
    """

    def __init__(self, cfg: Config, step: int, seconds: float, stop_signal: StopSignal):
        self.cfg, self.stop_signal = cfg, stop_signal
        self.last = Vote(step, seconds)
        self.next = self._plan()

    def seconds_at(self, step: int) -> float:
        """Training seconds before 0-based `step`: the last vote's, projected forward."""
        return self.last.seconds + (step - self.last.step) * (self.last.step_seconds or 0.0)

    def due(self, done: int) -> bool:
        """Whether a vote of our own falls after `done` steps."""
        return done >= self.next

    def vote(self, done: int, seconds: float, rider: torch.Tensor) -> tuple[float, Stop | None]:
        """Vote after `done` steps, this rank at `seconds`; `rider` (a scalar: the loss sum) is summed over
        the ranks in the same all-reduce. Returns its sum and why to stop (None: go on)."""
        cfg, received = self.cfg, self.stop_signal.received
        capped = bool(cfg.max_wallclock) and seconds >= cfg.max_wallclock
        ballot = torch.tensor([0.0, received == "SIGTERM", received == "SIGINT", capped, seconds, 1.0],
                              dtype=torch.float64,
                              device=rider.device if dist_backend_needs_device() else "cpu")
        ballot[0] = rider.to(ballot.device)  # a copy off the GPU when a single process votes on the CPU
        total, sigterm, sigint, capped_any, seconds_sum, ranks = all_reduce_sum(ballot).tolist()
        agreed = seconds_sum / ranks
        self.last = Vote(done, agreed, (agreed - self.last.seconds) / (done - self.last.step))
        self.next = self._plan()
        if done >= cfg.steps:  # the run is complete: nothing left to stop
            return total, None
        stop = Stop.SIGTERM if sigterm else Stop.SIGINT if sigint else Stop.WALLCLOCK if capped_any else None
        return total, stop

    def _plan(self) -> float:
        """The step count after which to hold the next vote of our own (inf: none)."""
        last, cap = self.last, self.cfg.max_wallclock
        if last.step_seconds is None:  # no step timed yet: under a cap, time the first one
            return last.step + 1 if cap else math.inf
        per_step = max(last.step_seconds, 1e-9)
        steps = VOTE_SECONDS / per_step
        if cap:
            steps = min(steps, (cap - last.seconds) / per_step / 2)
        return last.step + max(1, int(min(steps, self.cfg.steps)))


@dataclass(frozen=True)
class Due:
    """What falls after `done` steps: a log line, a validation, a checkpoint (a checkpoint step logs too)."""
    log: bool
    val: bool
    checkpoint: bool

    @classmethod
    def after(cls, done: int, cfg: Config) -> "Due":
        checkpoint = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
        return cls(log=done % cfg.log_every == 0 or done == cfg.steps or checkpoint,
                   val=bool(cfg.val_every) and done % cfg.val_every == 0, checkpoint=checkpoint)
