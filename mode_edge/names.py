"""Expert names: the one check every name passes before it touches a file, a folder, an archive or a URL.

An expert name becomes a folder (BUNDLE/experts/NAME, RUN/experts/NAME), an archive (NAME.modepack) and the last part
of a download URL, so it must be a plain name: never a path ('../x', 'a/b', '/abs'), never empty or '.', no
control characters. Pure Python: the device runtime calls it without torch.
"""

from __future__ import annotations

import re

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED = ("auto", "none")
"""Words `--experts` gives a meaning of its own (route on the prompt, the bare base); no expert can be named so."""
RULE = "use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit (not 'auto' or 'none')"

__all__ = ["check_name", "check_names", "expert_list", "split_names"]


def check_name(name: object, where: str = "") -> str:
    """Return `name` if it is a plain expert name; otherwise raise a UserError naming it (and `where` it came
    from: an option, a file) and the rule."""
    from mode_edge.errors import UserError

    where = where + ": " if where else ""
    if isinstance(name, str) and name.lower() in RESERVED:
        raise UserError(f"{where}{name!r} is a reserved word, not an expert name: '{name.lower()}' alone means "
                        f"{'route on the prompt' if name.lower() == 'auto' else 'the bare base'}, written in lower "
                        f"case and not in a list")  # fmt: skip
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{where}expert name {name!r} is not a plain name; {RULE}")
    return name


def check_names(names, where: str = "") -> list[str]:
    """Every name checked (see `check_name`), as a list; a name given twice is refused too (an expert is loaded
    once: `--experts code,code` would otherwise weigh it twice in the gate's softmax)."""
    from mode_edge.errors import UserError

    checked = [check_name(n, where) for n in names]
    twice = sorted({n for n in checked if checked.count(n) > 1})
    if twice:
        raise UserError(f"{where + ': ' if where else ''}expert {', '.join(twice)} is named twice; name each once")
    return checked


def split_names(value: str, option: str, keywords: tuple[str, ...] = ()) -> list[str] | str:
    """A comma-separated `--experts`-style value as checked names, or one of `keywords` ('auto', 'none') as is."""
    if value in keywords:
        return value
    return check_names([v.strip() for v in value.split(",") if v.strip()], option)


def expert_list(value: str, option: str) -> list[str]:
    """A comma-separated list of checked expert names; 'none' is the empty list."""
    names = split_names(value, option, keywords=("none",))
    return [] if names == "none" else names
