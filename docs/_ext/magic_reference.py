"""The ``mlx-cluster-magics`` directive: every subcommand of ``%mlx_cluster`` with every option,
read from the parsers the magic itself parses with (``mlx_cluster_magic.cluster.magics.PARSERS``),
in the words and with the defaults ``-h`` shows. The page cannot drift from the code."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(how it is typed, what it does) for every argument, as ``-h`` formats them."""
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        typed = formatter._format_action_invocation(action)
        rows.append((typed, formatter._expand_help(action) if action.help else ""))
    return rows


def _table(rows: list[tuple[str, str]]) -> nodes.table:
    table = nodes.table(classes=["mlx-cluster-options"])
    group = nodes.tgroup(cols=2)
    table += group
    group += nodes.colspec(colwidth=30)
    group += nodes.colspec(colwidth=70)
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body
    row = nodes.row()
    for text in ("option", "what it does"):
        row += nodes.entry("", nodes.paragraph(text=text))
    head += row
    for typed, text in rows:
        row = nodes.row()
        row += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=typed)))
        row += nodes.entry("", nodes.paragraph(text=text))
        body += row
    return table


def render(parsers: Mapping[str, argparse.ArgumentParser]) -> list[nodes.section]:
    """One section per subcommand: its description, its usage line and its options."""
    sections = []
    for name, parser in parsers.items():
        section_id = nodes.make_id(f"mlx-cluster-{name}")
        section = nodes.section(ids=[section_id], names=[nodes.fully_normalize_name(name)])
        section += nodes.title(text=f"%mlx_cluster {name}")
        if parser.description:
            section += nodes.paragraph(text=parser.description)
        usage = parser.format_usage().removeprefix("usage: ").strip()
        section += nodes.literal_block(usage, usage)
        section += _table(option_rows(parser))
        sections.append(section)
    return sections


class MagicsReference(SphinxDirective):
    """``{mlx-cluster-magics}`` in a page: the whole reference, generated at build time."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from mlx_cluster_magic.cluster.magics import PARSERS

        return list(render(PARSERS))


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("mlx-cluster-magics", MagicsReference)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
