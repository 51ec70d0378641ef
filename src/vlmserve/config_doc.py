"""Renders the settings table of the README from ServerConfig, so docs and --help cannot drift.

`python -m vlmserve.config_doc` prints the table (`--write README.md` puts it in place);
`tests/unit/test_config_doc.py` checks that the README holds exactly this table between its markers.
"""

from __future__ import annotations

import dataclasses

from vlmserve.config import ServerConfig

BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def settings_table() -> str:
    rows = ["| flag | environment | default | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(ServerConfig):
        env = ", ".join(f"`{e}`" for e in f.metadata.get("env", ())) or "-"
        default = "" if f.default in (None, ()) else str(f.default)
        if f.name == "cache_dir":
            default = "~/.cache/vlmserve"
        help_text = f.metadata["help"]
        choices = f.metadata.get("choices")
        if choices:
            help_text += " One of: " + ", ".join(choices) + "."
        rows.append(f"| `{flag_name(f.name)}` | {env} | {f'`{default}`' if default else ''} | {help_text} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    """The README text with the generated table between the markers."""
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        path = Path(sys.argv[2])
        path.write_text(readme_with_table(path.read_text()))
    else:
        print(settings_table())
