"""docs/configuration.md is generated from the GRPOConfig docstrings and must be up to date."""

import dataclasses
from pathlib import Path

from grpokit import GRPOConfig
from grpokit.cli import main
from grpokit.cli.docgen import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_md_is_up_to_date():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m grpokit.cli.docgen > docs/configuration.md`")


def test_every_field_is_documented(capsys):
    text = render()
    for f in dataclasses.fields(GRPOConfig):
        assert f"| `{f.name}` |" in text
    assert main(["docs"]) == 0
    assert capsys.readouterr().out == text
