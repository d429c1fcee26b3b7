"""The help formatter of every `megalodon-lm` command: defaults shown once, and only when there is one."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the default is None/False/suppressed or the help already states one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower() or text.endswith("]"):
            return text
        return super()._get_help_string(action)
