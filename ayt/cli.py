"""Shared pieces of the command-line parsers (`python -m ayt ...`, `ayt study`, `ayt notebook`)."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written and appends "(default: X)" to every option's help,
    unless the help already names its default or there is none to show (None, a store_true flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is argparse.SUPPRESS \
                or (default is False and action.nargs == 0) or (isinstance(default, (list, tuple)) and not default):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if isinstance(action, argparse.BooleanOptionalAction):
            shown = f"--{'' if default else 'no-'}{action.option_strings[0].lstrip('-').removeprefix('no-')}"
        return f"{text} (default: {str(shown).replace('%', '%%')})"
