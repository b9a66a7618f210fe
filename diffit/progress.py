"""Progress bars only where they can redraw: a tqdm bar when stderr (where tqdm writes) is a
terminal, the plain iterable otherwise, so a log file or CI output never collects carriage-return
redraws. Training prints its own plain progress lines off a terminal (training/feedback.py)."""
from __future__ import annotations

import sys
from typing import Iterable, Optional


def isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


def progress_bar(it: Iterable, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it") -> Iterable:
    if not isatty(sys.stderr):
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, unit=unit)
