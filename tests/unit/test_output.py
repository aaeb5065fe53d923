"""The terminal output every command shares: --json documents that any JSON parser reads."""

from __future__ import annotations

import json
import math


def test_json_documents_are_strict_json(capsys):
    from ftcli.cli.output import print_json

    print_json({"loss": math.nan, "perplexity": math.inf, "series": [1.5, -math.inf], "pair": (1, "x")})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    # a strict parser (as jq is) refuses the NaN / Infinity tokens Python writes by default
    document = json.loads(text, parse_constant=lambda token: (_ for _ in ()).throw(ValueError(token)))
    assert document == {"loss": None, "perplexity": None, "series": [1.5, None], "pair": [1, "x"]}
