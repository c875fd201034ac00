"""Training stage: the loop, run control (stop vote, signals, wall clock), run logging, optimizers."""
from .loop import claim_run_dir, pick_device, resume_config, train
