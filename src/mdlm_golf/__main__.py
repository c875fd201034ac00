"""`python -m mdlm_golf`: the mdlm-golf command line."""
import sys

from .console import run

sys.exit(run())
