"""Training stage: the loop, run control (stop vote, signals, wall clock), run logging, the run folder,
optimizers."""
from .control import RunInterrupted
from .loop import train
from .rundir import CHECKPOINT_NAME, check_run_dir, resume_config

__all__ = ["RunInterrupted", "train", "CHECKPOINT_NAME", "check_run_dir", "resume_config"]
