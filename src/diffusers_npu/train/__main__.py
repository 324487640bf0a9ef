"""``python -m diffusers_npu.train TASK [flags]``: what the launcher runs when a task has no example script."""
import sys

from ..cliutil import run_main
from ..errors import UsageError


def _main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0].startswith("-"):
        from .registry import task_names

        raise UsageError(f"usage: python -m diffusers_npu.train TASK [flags]; tasks: {', '.join(task_names())}")
    from . import main

    return main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(run_main(_main))
