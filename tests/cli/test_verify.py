from grpokit.cli import main
from grpokit.cli.verify import CLAIMS, Claim, run_verify


def test_verify_passes_and_prints_a_row_per_claim(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    for claim in CLAIMS:
        assert claim.name in out
    assert "all claims hold" in out


def test_verify_reports_a_failing_claim(monkeypatch):
    bad = Claim("deliberately false", "test", lambda g: 1.0)
    monkeypatch.setattr("grpokit.cli.verify.CLAIMS", [*CLAIMS[:2], bad])
    lines = []
    assert run_verify(print_fn=lines.append) == 1
    assert any("deliberately false" in line and "FAIL" in line for line in lines)
