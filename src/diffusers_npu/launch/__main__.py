"""``python -m diffusers_npu.launch TASK [options] -- [training flags]`` (same as ``diffusers-npu launch``)."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
