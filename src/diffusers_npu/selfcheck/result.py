"""One row of the self-check table."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional


@dataclass
class Result:
    check: str
    result: str                       # "pass" | "FAIL" | "skip"
    max_error: Optional[float] = None
    tolerance: Optional[float] = None
    seconds: float = 0.0
    note: str = ""
    argv: Optional[List[str]] = None  # training runs: the exact trainer command line, to rerun by hand
    # What ran instead of the NPU path ("" = the NPU path ran, or the row is not about one): a row that
    # passed on a fallback is no evidence about the NPU, and the table says so.
    fallback: str = ""

    def as_json(self) -> dict:
        row = asdict(self)
        if row["argv"] is None:
            del row["argv"]
        if not row["fallback"]:
            del row["fallback"]
        if row["max_error"] is not None and not math.isfinite(row["max_error"]):
            row["max_error"] = str(row["max_error"])  # JSON has no inf/nan
        return row


def attention_result(errors: list, paths: dict, tolerance: float) -> Result:
    """The row of an attention check over several cases: ``errors`` holds (relative error, case) pairs and
    ``paths`` counts the kernels that ran; the worst case against ``tolerance``, the paths in the note."""
    worst, case = max(errors)
    note = "paths: " + ", ".join(f"{p} x{n}" for p, n in sorted(paths.items())) + f"; worst: {case}"
    return Result("", "pass" if worst < tolerance else "FAIL", worst, tolerance, note=note)


def format_table(results: List[Result]) -> str:
    """The printed table: check, result, max error (and its tolerance), time, note. A result marked ``*`` ran a
    fallback instead of the NPU path (the note says which)."""
    rows = [("check", "result", "max error", "time", "note")]
    for r in results:
        err = "-" if r.max_error is None else f"{r.max_error:.1e}"
        if r.tolerance is not None:
            err += f" (< {r.tolerance:.0e})"
        shown = r.result + ("*" if r.fallback else "")
        note = f"FALLBACK: {r.fallback}; {r.note}" if r.fallback else r.note
        rows.append((r.check, shown, err, f"{r.seconds:.1f}s", note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(line.rstrip() for line in lines)
