"""docs/api.md tables every request field of the HTTP API as the code treats it."""

from __future__ import annotations

import re
from pathlib import Path

from services.gateway.openai_fields import CHAT, COMPLETION, HONOURED, REFUSED

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROW = re.compile(r"^\| `(?P<name>[a-z_]+)` \| (?P<chat>[^|]+) \| (?P<completion>[^|]+) \|", re.MULTILINE)


def test_the_doc_tables_every_field_as_the_code_does():
    rows = {m["name"]: (m["chat"].strip(), m["completion"].strip()) for m in ROW.finditer(DOC.read_text())}
    expected = {}
    for name, (endpoints, _) in HONOURED.items():
        expected[name] = tuple("honoured" if kind in endpoints else "refused (unknown here)" for kind in (CHAT, COMPLETION))
    for name in REFUSED:
        expected[name] = ("refused", "refused")
    assert rows == expected
