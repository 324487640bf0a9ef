"""Command-line plumbing shared by every entry point (training, inference, launcher, self-check).

* :class:`ArgumentParser` -- argparse without abbreviations (``--learning_rat`` is an error, not
  ``--learning_rate``), whose errors raise :class:`~diffusers_npu.errors.UsageError` (one line, exit 2)
  instead of printing the whole usage.
* :class:`HelpFormatter` -- shows each flag's effective default once: ``(default: X)`` is appended only
  when the help text does not already speak of its default and the default is not ``None``/``False``.
* :func:`run_main` -- run an entry point: one ``error: ...`` line and the error's exit code for any
  :class:`~diffusers_npu.errors.DiffusersNpuError`, 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Callable, Optional

from .errors import DiffusersNpuError, UsageError, one_line


class HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog, indent_increment=2, max_help_position=32, width=None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or re.search(r"\bdefaults?\b", text, re.IGNORECASE):
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or action.option_strings == []:  # identity: 0 == False would hide "(default: 0)"
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse parser: no abbreviations, errors raise :class:`UsageError` with a "did you mean"."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D102 - argparse API
        m = re.match(r"unrecognized arguments: (\S+)", message)
        if m:
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            near = difflib.get_close_matches(m.group(1).split("=", 1)[0], flags, n=1)
            if near:
                message += f" (did you mean {near[0]}?)"
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_main(func: Callable[[], Optional[int]]) -> int:
    """Call ``func`` and turn project errors into one line on stderr and their exit code."""
    try:
        status = func()
    except DiffusersNpuError as exc:
        print(one_line(exc), file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0 if status is None else int(status)


__all__ = ["ArgumentParser", "HelpFormatter", "run_main"]
