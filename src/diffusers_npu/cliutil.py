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


# ------------------------------------------------------------------------------------------ value types
def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False, what=None):
    """An argparse type: a finite ``kind`` (int or float) in [lo, hi] (open ends with ``lo_open``/``hi_open``)."""
    import math

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what or ('an integer' if kind is int else 'a number')}, "
                                             f"got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, "
                   f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
            raise argparse.ArgumentTypeError(f"expected {what or f'a value in {rng}'}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, 1, what="an integer >= 1")
nonneg_int = number(int, 0, what="an integer >= 0")
positive_float = number(float, 0.0, lo_open=True, what="a number > 0")
nonneg_float = number(float, 0.0, what="a number >= 0")
unit_float = number(float, 0.0, 1.0, what="a number in [0, 1]")


def multiple_of_8(text):
    """A positive multiple of 8 (image sizes: latents are 1/8 of the pixels for Stable Diffusion's VAE)."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 8, got {text!r}")
    return value


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


__all__ = ["ArgumentParser", "HelpFormatter", "multiple_of_8", "nonneg_float", "nonneg_int", "number",
           "positive_float", "positive_int", "run_main", "unit_float"]
