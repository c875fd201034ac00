"""Training stage: the loop, run control (stop vote, signals, wall clock), run logging, the run folder,
optimizers."""
from .loop import train
from .rundir import check_run_dir, resume_config

__all__ = ["train", "check_run_dir", "resume_config"]
