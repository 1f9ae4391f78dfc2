"""Docs generated from code stay equal to the code (regenerate with `python -m handlers.docgen`)."""
from __future__ import annotations

import pytest

from handlers.docgen import BLOCKS, ROOT, block_of


@pytest.mark.parametrize("rel", sorted(BLOCKS))
def test_generated_doc_block_matches_code(rel: str) -> None:
    name, make = BLOCKS[rel]
    text = (ROOT / rel).read_text()
    assert block_of(text, name) == make(), f"{rel} is stale: run `python -m handlers.docgen`"
