"""bench/papers.py: claims judged from the benches' results, every row naming its
command, and a claim with no results said to be not run (never "not reproduced")."""
import json

from bench import papers


def _runs(**finals):
    return {"runs": {arm: [{"seed": s, "final_accuracy": a} for s, a in enumerate(accs)]
                     for arm, accs in finals.items()}}


def test_verdicts_follow_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(papers, "OUT", tmp_path)
    (tmp_path / "heterogeneous.json").write_text(json.dumps(_runs(
        **{"splitmix-paper": [0.80, 0.82, 0.81], "splitmix": [0.9, 0.9, 0.9],
           "heterofl": [0.85, 0.85, 0.85], "reft-paper": [0.90, 0.91, 0.92],
           "reft": [0.9, 0.9, 0.9], "fedavg-common": [0.80, 0.81, 0.82]})))
    (tmp_path / "compression.json").write_text(json.dumps(_runs(
        **{"fedavg-fp32": [0.95] * 3, "fedavg-fedmrn": [0.93] * 3,
           "signsgd-mv": [0.6] * 3, "signsgd-fv-paper": [0.5] * 3,
           "signsgd-mv-50k": [0.6] * 3, "signsgd-fv-paper-50k": [0.7] * 3})))
    table = {r[0]: r for r in papers.rows()}
    assert table["SplitMix"][5] == "partly"  # only fedge's mode beats HeteroFL
    assert table["REFT"][5] == "reproduced"
    assert table["FedMRN"][5] == "reproduced"  # 2 points, the wide model not run
    assert table["signSGD-FV"][5] == "partly"  # FV wins on 50k only
    assert table["EcoFed"][5] == "not run"
    md = papers.to_markdown(list(table.values()))
    assert md.count("| `python bench/") == 5 and "**partly**" in md


def test_nothing_run_is_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(papers, "OUT", tmp_path)
    assert {r[5] for r in papers.rows()} == {"not run"}
