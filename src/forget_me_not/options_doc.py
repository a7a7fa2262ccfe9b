"""The options reference (docs/options.md), generated from the methods' config dataclasses.

    python -m forget_me_not.options_doc > docs/options.md

A test checks the committed file is current.
"""

from __future__ import annotations

from forget_me_not import methods
from forget_me_not.settings import field_help


def render() -> str:
    lines = ["# Options reference", "",
             "Every field a recipe (`recipes/*.yaml`) or `--set KEY=VALUE` can set, per method, "
             "with its default in the method's config (the recipes override these). Generated "
             "by `python -m forget_me_not.options_doc` from the config dataclasses.", ""]
    for name in methods.names():
        spec = methods.get(name)
        lines += [f"## {name}", "", spec.summary + ".", "", "| field | type | default | meaning |",
                  "|---|---|---|---|"]
        for field, kind, default, text in field_help(spec.config_class):
            shown = repr(default).replace("|", "\\|")
            lines.append(f"| `{field}` | {kind} | `{shown}` | {text.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
