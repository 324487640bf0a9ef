"""The real trainer (``examples/text_to_image/train_text_to_image.py``'s entry point) with a learning check of
1 image per digit instead of 10, so that a launcher test can reach the check's verdict on two processes in
seconds. Run by the launcher as ``--script``."""
import functools
import sys

import diffusers_npu.embedded as embedded

embedded.learning_check = functools.partial(embedded.learning_check, per_digit=1)

if __name__ == "__main__":
    from diffusers_npu.train import main

    sys.exit(main("text_to_image"))
