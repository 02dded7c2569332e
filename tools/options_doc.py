"""Write docs/options.md from the command's own parser, so the table is always complete:
    python tools/options_doc.py          (tests/unit/test_cli.py checks it is current)"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def render() -> str:
    from stack.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = ["# Commands and options", "",
           "Every `tapstack` command and option, as `tapstack COMMAND --help` gives them "
           "(this page is written from the same parser by `tools/options_doc.py`).", ""]
    for name, sp in sub.choices.items():
        out += [f"## `tapstack {name}`", ""]
        if helps.get(name):
            out += [helps[name][0].upper() + helps[name][1:] + ".", ""]
        rows = []
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if isinstance(a, argparse._SubParsersAction):
                rows += [(f"`{n}`", "", next(c.help for c in a._choices_actions
                                            if c.dest == n) or "")
                         for n in a.choices]
                continue
            names = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest.upper()}`"
            if a.option_strings and a.nargs != 0 and a.metavar:
                names += f" {a.metavar}"
            default = a.default
            shown = "" if default in (None, False, [], argparse.SUPPRESS) else f"`{default}`"
            text = re.sub(r"\s*\(default: %\(default\)s\)", "", a.help or "")
            text = text.replace("%(default)s", str(default)).replace("%%", "%")
            if a.choices:
                text += ("; " if text else "") + "one of " + ", ".join(map(str, a.choices))
            rows.append((names, shown, text.replace("|", "/")))
        if rows:
            out += ["| option | default | meaning |", "|---|---|---|"]
            out += [f"| {n} | {d} | {t} |" for n, d, t in rows]
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    (REPO / "docs" / "options.md").write_text(render())
