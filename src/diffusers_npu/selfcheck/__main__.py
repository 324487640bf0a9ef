"""``python -m diffusers_npu.selfcheck`` (what test/npu_selfcheck.sh runs)."""
import sys

from . import main

sys.exit(main())
