#!/usr/bin/env python3
"""Regenerate the configuration reference in docs/install.md from policy_agent/config.py.

    .venv/bin/python scripts/gen-config-docs.py            # rewrite docs/install.md in place
    .venv/bin/python scripts/gen-config-docs.py --check    # exit 1 if it is out of date

The text between the two markers is replaced by ``policy_agent.config.reference_markdown()``;
everything else in the file is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DOC = REPO / "docs" / "install.md"
BEGIN = "<!-- BEGIN GENERATED CONFIG REFERENCE: scripts/gen-config-docs.py -->"
END = "<!-- END GENERATED CONFIG REFERENCE -->"


def splice(text: str, reference: str, origin: str = "document") -> str:
    """text with the part between the markers replaced by reference."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{origin}: needs exactly one {BEGIN!r} and one {END!r}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    if END in head:
        raise ValueError(f"{origin}: the end marker comes before the begin marker")
    return f"{head}{BEGIN}\n{reference.rstrip()}\n{END}{tail}"


def current_reference() -> str:
    sys.path.insert(0, str(REPO))
    from policy_agent.config import reference_markdown

    return reference_markdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    p.add_argument("path", nargs="?", default=str(DEFAULT_DOC), help="the document (default docs/install.md)")
    args = p.parse_args(argv)
    path = Path(args.path)
    text = path.read_text()
    try:
        new = splice(text, current_reference(), str(path))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if new == text:
        return 0
    if args.check:
        print(f"{path}: the configuration reference is out of date; run scripts/gen-config-docs.py", file=sys.stderr)
        return 1
    path.write_text(new)
    print(f"{path}: configuration reference regenerated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
