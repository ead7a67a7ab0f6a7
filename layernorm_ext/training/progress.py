"""A progress bar on stderr for runs long enough to need one."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

PROGRESS_MODES = ("auto", "on", "off")
AUTO_DELAY_S = 2.0  # in auto mode, runs shorter than this never show a bar


def check_progress_mode(mode: str) -> None:
    """Raises ValueError for an unknown mode, ImportError when ``on`` lacks tqdm."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode == "on":
        try:
            import tqdm  # noqa: F401
        except ImportError as error:
            raise ImportError("--progress on needs tqdm (pip install tqdm)") from error


class ProgressBar:
    """A tqdm bar over all training steps, written to stderr.

    ``auto`` shows it only when stderr is a terminal and the run lasts more than
    ``AUTO_DELAY_S`` seconds; ``on`` always (also when stderr is a file); ``off`` never.
    Lines printed inside :meth:`printing` go to stdout around the bar, so the per-epoch
    lines are the same with or without it.
    """

    def __init__(self, total: int, mode: str = "auto", description: str = "training") -> None:
        check_progress_mode(mode)
        self._bar = None
        if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return
        try:
            from tqdm import tqdm
        except ImportError:  # only in auto mode: "on" checked for it
            return
        self._bar = tqdm(total=total, desc=description, unit="step", file=sys.stderr,
                         delay=AUTO_DELAY_S if mode == "auto" else 0.0, leave=False,
                         dynamic_ncols=True)

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    @contextmanager
    def printing(self) -> Iterator[None]:
        """Clears the bar while the block prints to stdout, then draws it again."""
        if self._bar is None:
            yield
            return
        with type(self._bar).external_write_mode(file=sys.stdout):
            yield

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
