"""Progress display: a tqdm bar on a terminal, plain log lines otherwise (CI, files, pipes)."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

from .metrics import format_duration


class Progress:
    """mode: auto | bar | plain | none. `write` always prints; `plain` prints only without a bar.

    `total` may be None (a time-limited run before its step time is known): the bar then shows no ETA until
    `set_total`. A time-limited run also shows the budget left.
    """

    def __init__(self, mode: str, total: int | None, initial: int = 0) -> None:
        self.bar_mode = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "none"
        # A terminal that reports no size (some ptys) would hide the bar: give tqdm a fixed size there.
        try:
            wide = os.get_terminal_size(sys.stderr.fileno()).columns >= 40
        except OSError:
            wide = False
        self.bar = (tqdm(total=total, initial=initial, unit="step", dynamic_ncols=wide,
                         ncols=None if wide else 110, nrows=None if wide else 40)
                    if self.bar_mode else None)

    def update(self, step: int, loss: float, tok_s: float, lr: float, time_left: float | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            postfix = {"loss": f"{loss:.4f}", "tok_s": f"{tok_s:,.0f}", "lr": f"{lr:.2e}"}
            if time_left is not None:
                postfix["budget_left"] = format_duration(max(0.0, time_left))
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def set_total(self, total: int) -> None:
        if self.bar is not None and total != self.bar.total:
            self.bar.total = total
            self.bar.refresh()

    def write(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def plain(self, text: str) -> None:
        if self.bar is None and not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
