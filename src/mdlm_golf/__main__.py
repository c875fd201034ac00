"""`python -m mdlm_golf`: the mdlm-golf command line."""
import sys

from .cli import main

sys.exit(main())
