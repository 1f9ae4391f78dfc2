"""Docs generated from code stay equal to the code."""
from __future__ import annotations

from pathlib import Path

from qapubsub.topology import markdown_tables

ROOT = Path(__file__).resolve().parents[2]


def test_topology_doc_matches_code() -> None:
    text = (ROOT / "docs" / "topology.md").read_text()
    begin, end = "<!-- topology:begin -->\n", "<!-- topology:end -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == markdown_tables(), "docs/topology.md is stale: regenerate its table from qapubsub.topology"
