"""Stage 6: the oracle's two links in the table, and the examples page (examples.md, images beside it)."""
import json
import re

from conftest import copy_of_tiny_run, load_stage

stage6 = load_stage("06_eval.py")


def record(row, sample, kind, **extra):
    return {"row": row, "sample": sample, "kind": kind, **extra}


def test_link_failure_rates_and_kinds_by_hand():
    links = [(True, True), (False, True), (True, False), (False, False)]
    records = [{"oracle_steps": s, "oracle_answer": a} for s, a in links]
    # steps fail in rows 2 and 4 -> 2/4; the answer link fails in rows 3 and 4 -> 2/4
    assert stage6.link_failure_rates(records) == {"ir_steps": 0.5, "ir_answer": 0.5}
    assert stage6.link_failure_rates([{"oracle_steps": None, "oracle_answer": None}]) == {"ir_steps": None,
                                                                                          "ir_answer": None}
    # oracle first: inconsistent and right -> IC even if the CRM says 0.9; without an oracle the CRM at 0.5 decides
    assert stage6.kind_of({"oracle_consistent": False, "accuracy": 1.0, "crm_prob": 0.9}) == "IC"
    assert stage6.kind_of({"oracle_consistent": None, "accuracy": 0.0, "crm_prob": 0.5}) == "CW"
    assert stage6.kind_of({"oracle_consistent": None, "accuracy": 0.0, "crm_prob": 0.49}) == "IW"


def test_the_table_shows_both_links_next_to_the_oracle_ir():
    row = {"accuracy": 0.5, "ir_oracle": 0.3, "ir_steps": 0.2, "ir_answer": 0.15, "ir_crm": 0.2, "format_rate": 1.0,
           "CC": 0.4, "CW": 0.3, "IC": 0.1, "IW": 0.2, "length": 25.0}
    table = stage6.markdown_table({"sft": [row]})
    assert table.splitlines()[0].startswith("| checkpoint | runs | accuracy | ir_oracle | ir_steps | ir_answer |")
    assert "| sft | 1 | 50.0 | 30.0 | 20.0 | 15.0 | 20.0 |" in table


def test_pick_examples_finds_the_rare_kinds():
    # two checkpoints, 10 prompts x 2 samples, every completion CC except: row 7, checkpoint b, sample 1 is IW,
    # and row 3, checkpoint a, sample 0 is IC. Taking the first prompts in order would show CC only.
    records = {name: [record(row, j, "CC") for row in range(10) for j in range(2)] for name in ("a", "b")}
    records["b"][7 * 2 + 1]["kind"] = "IW"
    records["a"][3 * 2 + 0]["kind"] = "IC"
    picked = stage6.pick_examples(records, 3)
    # first pick: every row adds CC (1 new kind) except rows 3 and 7, which add CC and IC / IW (2): row 3 (lowest)
    # second: row 7 adds IW (CC, IC already shown); third: any row adds nothing new -> the lowest left, row 0
    assert [(c["a"]["row"], c["b"]["row"]) for c in picked] == [(3, 3), (7, 7), (0, 0)]
    assert (picked[0]["a"]["kind"], picked[1]["b"]["kind"], picked[1]["b"]["sample"]) == ("IC", "IW", 1)
    kinds = {r["kind"] for c in picked for r in c.values()}
    assert kinds == {"CC", "IC", "IW"}  # every kind in the records is on the page
    assert len(stage6.pick_examples(records, 50)) == 10  # no more prompts than there are


def test_fenced_outgrows_backticks_inside():
    assert stage6.fenced("a ``` b").startswith("````text\n")  # three inside -> a fence of four
    assert stage6.fenced("plain") == "```text\nplain\n```"


def test_stage6_writes_the_split_and_an_examples_page_with_every_kind(tiny_run, tmp_path):
    run = copy_of_tiny_run(tiny_run, tmp_path / "runs")
    policy = str(run / "policy_sft")
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run.parent), checkpoints=f"sft={policy},again={policy}",
                                        n=8, samples=3, max_new_tokens=48, seed=5, examples=6, device="cpu"))
    saved = json.loads((run / "eval.json").read_text())["checkpoints"]
    for metrics in saved.values():
        # a completion is inconsistent when a link fails: max(ir_steps, ir_answer) <= IR <= ir_steps + ir_answer
        assert max(metrics["ir_steps"], metrics["ir_answer"]) <= metrics["ir_oracle"] + 1e-9
        assert metrics["ir_oracle"] <= metrics["ir_steps"] + metrics["ir_answer"] + 1e-9
    assert "ir_steps" in (run / "eval.md").read_text() and results["sft"]["n"] == 24
    page = (run / "examples.md").read_text()
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", page)
    assert 1 <= len(images) <= 6 and all((run / image).is_file() for image in images)
    assert all(image.startswith("examples/") for image in images)
    present = {kind for metrics in saved.values() for kind in ("CC", "CW", "IC", "IW") if metrics[kind] > 0}
    on_page = set(re.findall(r"kind \*\*(CC|CW|IC|IW)\*\*", page))
    assert on_page == present  # every kind the evaluation counted is shown, and no other
    assert page.count("- **sft**, sample") == len(images) and page.count("- **again**, sample") == len(images)
    assert not list(run.glob("*.tmp")) and not list((run / "examples").glob("*.tmp.png"))
