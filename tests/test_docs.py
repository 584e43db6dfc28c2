"""The README's and the results pages' generated figures agree with the committed records, and the docs' links
resolve.

``benchmarks/report.py`` renders every marked block (``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``) and the
numbers behind the README's figure from the JSON-lines files in ``benchmarks/results/``; a doc edited by hand,
or a record added without ``python benchmarks/report.py``, fails here.
"""

from pathlib import Path

import pytest

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    return load_benchmark("report")


def test_every_generated_block_and_the_readme_figure_agree_with_the_records(report):
    bad = report.check()
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_changed_figure(report, tmp_path, monkeypatch):
    """The check can fail: a README whose reading names another number is caught."""
    readme = tmp_path / "README.md"
    text = report.README.read_text()
    block = report.current(text, "results-glance")
    assert block and "D = " in block  # the form rule's numbers: in the reading whether the grid is complete or not
    readme.write_text(text.replace(block, block.replace("D = ", "D = 1", 1), 1))
    monkeypatch.setattr(report, "README", readme)
    assert any("results-glance" in line for line in report.check())


def test_readme_is_an_entry_point():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for heading in ("## Install", "## Quickstart", "## Results at a glance", "## The Python API", "## Documentation"):
        assert heading in text, heading
    for page in ("serving", "large_models", "distributed", "reliability", "cli", "results"):
        assert f"docs/{page}.md" in text and (ROOT / "docs" / f"{page}.md").is_file(), page
    assert "docs/figures/results_at_a_glance.png" in text and (ROOT / "docs/figures/results_at_a_glance.png").is_file()


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_in_the_readme_and_docs_resolve():
    """Every relative link in README.md and docs/ (study pages included) points at a file that exists and, for a
    Markdown target with ``#anchor``, at one of its headings."""
    import re

    bad = []
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for m in re.finditer(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", f.read_text()):
            target, anchor = m.group(1), m.group(2)
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (f.parent / target) if target else f
            if not path.exists():
                bad.append(f"{f.relative_to(ROOT)} -> {target}")
            elif anchor and path.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
                if anchor[1:] not in slugs:
                    bad.append(f"{f.relative_to(ROOT)} -> {target}{anchor} (no such heading)")
    assert not bad, bad


def test_results_summary_is_short_and_links_every_study_page():
    """docs/results.md is a summary a reader can finish; each study has its own page, linked from it."""
    text = (ROOT / "docs" / "results.md").read_text()
    assert len(text.splitlines()) <= 250
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert len(pages) >= 6
    for page in pages:
        assert f"results/{page.name}" in text, page.name


def test_grace_rule_adopts_only_a_minilm_gain_without_a_tiny64_loss(report):
    """docs/results.md §3's grace rule on hand-made planted records (relative losses by seed)."""
    def recs(base, g0, g1):
        steps, lr = report.GRACE_BASES[base]
        common = {"base": base, "setting": "concentrated", "steps": steps, "r": 2, "lr": lr}
        return ([{**common, "method": "elalora-lora", "seed": s, "rel_loss": v} for s, v in enumerate(g0)]
                + [{**common, "method": "elalora-lora-g1", "seed": s, "rel_loss": v} for s, v in enumerate(g1)])

    gain = recs("minilm", [0.40, 0.41, 0.42], [0.39, 0.40, 0.41])  # -0.01 in every seed: interval [-0.01, -0.01]
    flat = recs("tiny64", [0.05, 0.06, 0.07], [0.06, 0.05, 0.07])  # +0.01, -0.01, 0: a tie
    worse = recs("tiny64", [0.05, 0.06, 0.07], [0.06, 0.07, 0.08])  # +0.01 in every seed: a loss
    g = report.grace_rule(gain + flat)
    assert g["minilm"]["n"] == 3 and abs(g["minilm"]["mean"] + 0.01) < 1e-9 and g["adopt"]
    assert not report.grace_rule(gain + worse)["adopt"]
    assert not report.grace_rule(recs("minilm", [0.40, 0.41, 0.42], [0.41, 0.40, 0.42]) + flat)["adopt"]
    assert "stays 0" in report.grace_rule_text(gain + worse)


def test_readme_regime_line_pairs_each_form_with_peft_lora_at_twenty_epochs(report, monkeypatch):
    """The README's line on MRPC for 20 epochs, on hand-made records: each form minus PEFT LoRA over the
    seeds both have; a form without a paired seed is left out, and no long records means no line."""
    def rec(protocol, method, seed, f1):
        return {"protocol": protocol, "task": "mrpc", "r": 8, "method": method, "seed": seed, "main": f1 / 100}

    base, lora, svd = "peft-lora", report.FORM_ARMS["lora"], report.FORM_ARMS["svd"]
    recs = ([rec(report.LONG, base, s, v) for s, v in enumerate([85.0, 85.0, 85.0, 85.0])]
            + [rec(report.LONG, lora, s, v) for s, v in enumerate([86.0, 87.0, 88.0])]  # +1, +2, +3
            + [rec(report.PROTOCOL, svd, 0, 99.0)])  # the 2-epoch grid: not the papers' regime
    line = report.long_regime_line(recs)
    assert "the LoRA form with no grace +2.0 [-0.5, +4.5] tie (n=3)" in line and "SVD form" not in line, line
    assert "at its defaults" not in line, line  # the default arm has no 20-epoch record here
    assert "MRPC trained for 20 epochs" in line
    # mean -0.75, t(3) 3.182 -> h 0.459
    recs += [rec(report.LONG, svd, s, v) for s, v in enumerate([84.0, 84.5, 84.0, 84.5])]
    assert "the SVD form -0.8 [-1.2, -0.3] loss (n=4)" in report.long_regime_line(recs)
    assert report.long_regime_line([r for r in recs if r["protocol"] != report.LONG]) == ""
    # the default arm comes first, named as such; a default that is a form rule arm is named once
    assert list(report.long_words("elalora-lora-g1")) == ["elalora-lora-g1", lora, svd]
    assert list(report.long_words(lora)) == [lora, svd] and "defaults" in report.long_words(lora)[lora]
    monkeypatch.setattr(report, "LONG_WORDS", report.long_words("elalora-lora-g1"))
    recs += [rec(report.LONG, "elalora-lora-g1", s, v) for s, v in enumerate([85.0, 86.0])]  # +0, +1
    line = report.long_regime_line(recs)
    assert f"by seed: at its defaults ({report.DEFAULTS_TEXT}) +0.5 [-5.9, +6.9] tie (n=2); the LoRA" in line, line


def test_long_vs_short_pairs_each_long_seed_with_the_same_seed_at_two_epochs(report):
    """docs/results.md §1's 2-vs-20-epoch table on hand-made MRPC records: means over all short seeds, the
    gain paired by seed (seed 4 has no long cell, so it enters the mean but not the pairing)."""
    def rec(protocol, method, seed, f1):
        return {"protocol": protocol, "task": "mrpc", "r": 8, "method": method, "seed": seed, "main": f1 / 100}

    m = report.LONG_METHODS[0]
    recs = ([rec(report.PROTOCOL, m, s, v) for s, v in enumerate([80.0, 82.0, 84.0, 86.0, 88.0])]
            + [rec(report.LONG, m, s, v) for s, v in enumerate([81.0, 84.0, 87.0])]
            + [rec("v2", m, 0, 10.0)])  # another protocol: ignored
    row = [x for x in report.long_vs_short(recs).splitlines() if x.startswith("| ")][1]
    # gains +1, +2, +3: mean 2, sd 1, t(0.975, 2) = 4.303 -> half-width 2.484
    assert "84.0 ± 3.2 (5 seeds)" in row and "81.0, 84.0, 87.0 (84.0 ± 3.0)" in row, row
    assert "+2.0 [-0.5, +4.5] tie (n=3)" in row, row
    one = report.long_vs_short(recs[:1]).splitlines()
    assert "| 80.0 (1 seed) | – (–) | – |" in one[2] and "| – (0 seeds) | – (–) | – |" in one[3], one
