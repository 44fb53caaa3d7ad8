"""Stage 1: task generator, parsing and the rule oracle, tiny models through the Auto classes, SFT, CRM, bad input."""
import json

import pytest
import torch
from PIL import Image

from adapters import real_data


def test_generator_is_deterministic_by_seed(stage1):
    cfg = stage1.Config(n_train=20, n_test=5, seed=3)
    a, b = stage1.build_embedded_dataset(cfg), stage1.build_embedded_dataset(cfg)
    other = stage1.build_embedded_dataset(stage1.Config(n_train=20, n_test=5, seed=4))
    for split in ("train", "test"):
        assert a[split]["sft_target"] == b[split]["sft_target"]
        assert [im.tobytes() for im in a[split]["image"]] == [im.tobytes() for im in b[split]["image"]]
    assert a["train"]["sft_target"] != other["train"]["sft_target"]


def test_oracle_agrees_with_how_traces_were_made(stage1):
    data = stage1.build_embedded_dataset(stage1.Config(n_train=400, n_test=0, inconsistent_frac=0.5))["train"]
    kinds = set()
    for row in data:
        think, answer = stage1.parse_completion(row["solution"])
        assert answer == row["answer"] and stage1.oracle_consistent(think, answer)  # the solution is consistent
        think, answer = stage1.parse_completion(row["sft_target"])
        assert stage1.oracle_consistent(think, answer) == (row["sft_kind"] == "consistent")
        assert stage1.answers_match(answer, row["answer"]) == (row["sft_kind"] != "right_thinking_wrong_answer")
        kinds.add(row["sft_kind"])
    assert kinds == {"consistent", "right_thinking_wrong_answer", "wrong_thinking_right_answer"}
    share = sum(k != "consistent" for k in data["sft_kind"]) / len(data)
    assert 0.4 < share < 0.6  # inconsistent_frac 0.5


def test_images_show_the_answer(stage1):
    """The tallest bar in pixels is the answer; the count task draws as many coloured shapes as it says."""
    data = stage1.build_embedded_dataset(stage1.Config(n_train=60, n_test=0))["train"]
    for row in data:
        image = row["image"].convert("RGB")
        if row["family"] == "bars":
            w, h = image.size
            tops = []
            for x0 in (6 + i * (w // 5 + w // 10) + 2 for i in range(3)):  # a column inside each bar
                dark = [y for y in range(h) if image.getpixel((x0, y))[0] < 100]
                tops.append(min(dark))
            assert "ABC"[tops.index(min(tops))] == row["answer"]
        else:
            colour = stage1.COLOURS[row["question"].split()[2]]
            cells = {(x // 14, y // 14) for x in range(0, 84) for y in range(0, 84) if image.getpixel((x, y)) == colour}
            assert len(cells) == int(row["answer"])


@pytest.mark.parametrize("text, think, answer", [
    ("<think>1, 2. So the answer is 2.</think><answer>2</answer>", "1, 2. So the answer is 2.", "2"),
    ("<think>a</think><answer>1</answer><answer> 3 </answer>", "a", "3"),  # the last answer counts
    ("<think>\nline one\nline two\n</think>\n<answer>B</answer>", "line one\nline two", "B"),  # multi-line
    ("<think>a</think><answer>   </answer>", "a", None),  # an empty answer is no answer
    ("<think>unclosed <answer>4", None, None),
    ("", None, None),
])
def test_parse_completion(stage1, text, think, answer):
    assert stage1.parse_completion(text) == (think, answer)


def test_answers_match_and_oracle(stage1):
    assert stage1.answers_match("3.0", "3") and stage1.answers_match(" b. ", "B") and stage1.answers_match("(C)", "c")
    assert not stage1.answers_match("4", "3") and not stage1.answers_match(None, "3") and not stage1.answers_match("", "")
    assert stage1.oracle_consistent("I count: 1, 2, 3. So the answer is 3.", "3")
    assert not stage1.oracle_consistent("I count: 1, 2, 3. So the answer is 3.", "4")
    assert not stage1.oracle_consistent("no conclusion here", "3")  # nothing concluded: not supported
    assert stage1.thinking_conclusion("the answer is 2. Wait, the answer is B.") == "B"  # the last one


def test_tiny_models_round_trip_through_auto_classes(tiny_run, stage1):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    reloaded = AutoTokenizer.from_pretrained(tiny_run["dir"] / "policy_sft")
    text = "<think>I count the red shapes: 1, 2. So the answer is 2.</think><answer>2</answer><|im_end|>"
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert len(reloaded.tokenize("<think>")) == 1  # the reasoning tags are atomic
    crm = AutoModelForSequenceClassification.from_pretrained(tiny_run["dir"] / "crm")
    assert crm.config.id2label[1] == "consistent" and type(crm).__name__ == "ModernBertForSequenceClassification"
    crm_tok = AutoTokenizer.from_pretrained(tiny_run["dir"] / "crm")
    ids = crm_tok("premise text", "The final answer is 3.")["input_ids"]
    assert ids[0] == crm_tok.cls_token_id and ids.count(crm_tok.sep_token_id) == 2


def test_qwen25_vl_loads_and_generates(tiny_qwen25, stage1):
    model, processor = stage1.load_policy(str(tiny_qwen25), "cpu")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prompt = stage1.encode_prompts(processor, [Image.new("RGB", (84, 84), "white")], ["How many red shapes are there?"])
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)


def test_sft_loss_falls_and_the_check_reports(tiny_run):
    summary = tiny_run["summary"]
    assert summary["sft_loss"]["last_10pct"] < 0.5 * summary["sft_loss"]["first_10pct"]
    check = summary["policy_check"]
    assert check["n"] == 20 and 0.0 <= check["accuracy"] <= 1.0 and check["format_rate"] > 0.5
    assert 0.0 <= check["oracle_steps_fail_rate"] <= 1.0 and 0.0 <= check["oracle_answer_fail_rate"] <= 1.0
    steps = summary["crm_on_step_pairs"]  # 40 test tasks x 2 pairs (step_conclusion_pairs)
    assert steps["n"] == 80 and 0.0 <= steps["accuracy"] <= 1.0 and 0.0 <= steps["seen_in_training"] <= 1.0
    rollouts = summary["crm_on_policy_rollouts"]
    assert rollouts["steps_link_fails"] + rollouts["answer_link_fails"] - rollouts["both_links_fail"] == round(
        rollouts["n"] * (1 - rollouts["consistent_share"]))  # every inconsistent rollout fails a link


def test_crm_beats_chance_on_a_short_run(stage1, tiny_run, tmp_path):
    from datasets import load_from_disk

    data = load_from_disk(str(tiny_run["dir"] / "data"))
    cfg = stage1.Config(crm_steps=500, crm_batch_size=32, crm_lr=1e-3, device="cpu")  # 5e-4 needs ~1000 steps to leave the plateau
    stage1.build_tiny_crm(tmp_path / "crm", 0, stage1.train_bpe(0))
    crm, tok = stage1.load_crm(str(tmp_path / "crm"), "cpu")
    stage1.train_crm(cfg, crm, tok, stage1.embedded_crm_pairs(data["train"], 0))
    held_out = stage1.embedded_crm_pairs(data["test"], 0)  # 40 tasks x 8 pairs, 3 of 8 consistent
    report = stage1.classification_report(stage1.crm_scores(crm, tok, held_out, "cpu"), [p["label"] for p in held_out])
    # The chain oracle labels the steps-vs-conclusion pairs 0, so 5 of every 8 pairs are inconsistent: always
    # saying "inconsistent" scores accuracy 0.625 and F1 0 (it was 0.5 when the pairs were balanced, hence the
    # old bound 0.65). Measured 0.744 and F1 0.568 (2026-11-26, 2 CPU cores).
    assert report["accuracy"] > 0.68 and report["f1"] > 0.3


# ----------------------------------------------------------------------------- bad input
def test_unknown_column_names_it_and_the_columns(stage1, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"img": "a.png", "q": "How many?", "a": "3"}) + "\n")
    with pytest.raises(SystemExit, match=r"no column 'image'.*\['img', 'q', 'a'\].*--image-column"):
        real_data.load_real_dataset(stage1.Config(dataset=str(path)))


def test_unreadable_image_names_the_row(stage1, tmp_path):
    Image.new("RGB", (28, 28)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"image": name, "question": "q?", "answer": "1"}) + "\n"
                            for name in ["good.png", "bad.png"]))
    data = real_data.load_real_dataset(stage1.Config(dataset=str(path), test_split="train"))["train"]
    assert stage1.row_image(data, 0, "image").size == (28, 28)
    with pytest.raises(SystemExit, match="row 1: cannot read the image"):
        stage1.row_image(data, 1, "image")


def test_malformed_crm_jsonl_names_the_line(stage1, tmp_path):
    path = tmp_path / "labels.jsonl"
    good = {"question": "q", "thinking": "t", "answer": "a", "label": "consistent"}
    path.write_text(json.dumps(good) + "\n" + '{"question": "q", "thinking": \n')
    with pytest.raises(SystemExit, match="labels.jsonl, line 2"):
        real_data.read_crm_jsonl(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": "maybe"}) + "\n")
    with pytest.raises(SystemExit, match="line 2.*maybe"):
        real_data.read_crm_jsonl(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert real_data.read_crm_jsonl(str(path))[0]["label"] == 1


def test_missing_earlier_stage_says_which_command(tmp_path):
    from conftest import load_stage

    stage2 = load_stage("02_rollout.py")
    with pytest.raises(SystemExit, match="python 01_sft_rm.py"):
        stage2.main(stage2.Config(runs_dir=str(tmp_path), run="nothing"))


# ----------------------------------------------------------------------------- an LLM judge on the embedded tasks
JUDGE_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_tiny_judge(folder, stage1) -> None:
    """A 2-layer random Llama with a word-level tokenizer over the judge prompt's and the embedded traces'
    words (as tests/test_judge.py builds one). The output layer is zero but for "consistent" (+d) and
    "inconsistent" (-d), d a random direction with the mean final state of sample prompts projected out: the
    first greedy token is always a verdict, and which one changes from prompt to prompt. A random judge."""
    import random
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from adapters import judge as jd

    rng = random.Random(0)
    tasks = [stage1.make_task(rng, 56, 0.5) for _ in range(40)]
    samples = [jd.judge_prompt({"question": t["question"], "thinking": stage1.parse_completion(t["sft_target"])[0],
                                "answer": t["answer"]}) for t in tasks]
    words = sorted({w for text in [jd.JUDGE_PROMPT] + samples + ["consistent inconsistent <user> <assistant>"]
                    for w in re.findall(r"\w+|[^\w\s]+", text)})
    vocab = {token: i for i, token in enumerate(["[UNK]", "</s>"] + words)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="</s>")
    tokenizer.chat_template = JUDGE_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, pad_token_id=None,
                         eos_token_id=vocab["</s>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        inputs = [tokenizer(f"<user> {p} <assistant>", return_tensors="pt") for p in samples[:10]]
        last = torch.cat([model.model(**x).last_hidden_state[:, -1] for x in inputs])  # (10, 32)
        mean = last.mean(0) / last.mean(0).norm()  # (32,)
        direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
        direction = 100 * (direction - (direction @ mean) * mean)
        model.lm_head.weight.zero_()
        model.lm_head.weight[vocab["consistent"]] = direction
        model.lm_head.weight[vocab["inconsistent"]] = -direction
    model.save_pretrained(folder)


def test_embedded_run_with_a_judge_reports_its_agreement_with_the_oracle(stage1, tiny_run, tmp_path):
    """--judge on the embedded tasks: the CRM is trained as without it, and stage1.json holds the judge's labelling
    stats and its agreement with the rule oracle on the SFT policy's rollouts; crm_data.jsonl holds exactly the
    judge's verdicts (asked again here, one row at a time) in the --crm-data format."""
    from transformers import AutoTokenizer

    from adapters import judge as jd

    build_tiny_judge(tmp_path / "judge", stage1)
    cfg = stage1.Config(run="judged", runs_dir=str(tmp_path / "runs"), n_train=40, n_test=10, device="cpu",
                        policy=str(tiny_run["dir"] / "policy_sft"), skip_policy_sft=True, crm_steps=10,
                        crm_batch_size=16, eval_n=4, crm_rollout_prompts=20, crm_rollout_samples=2,
                        max_new_tokens=48, judge=str(tmp_path / "judge"), judge_batch_size=8, crm_max_length=256)
    summary = stage1.main(cfg)
    judged = summary["judge"]
    assert judged["judge"] == cfg.judge and judged["rows"] > 0 and judged["unparseable"] == 0  # always a verdict
    assert judged["labelled"] == judged["rows"] == judged["consistent"] + judged["inconsistent"]
    assert 0 < judged["consistent"] < judged["labelled"]  # the verdict changes with the prompt
    rows = real_data.read_crm_jsonl(str(tmp_path / "runs" / "judged" / "crm_data.jsonl"))
    assert len(rows) == judged["labelled"] and sum(r["label"] for r in rows) == judged["consistent"]
    unlabelled = [{k: r[k] for k in ("question", "thinking", "answer")} for r in rows]
    again, _ = jd.label_rows(jd.LocalJudge(cfg.judge, batch_size=1), unlabelled)
    assert [r["label"] for r in again] == [r["label"] for r in rows]
    oracle = [int(stage1.oracle_consistent(r["thinking"], r["answer"])) for r in rows]
    agreement = judged["agreement"]
    assert agreement == jd.agreement([r["label"] for r in rows], oracle)
    assert agreement["n"] == len(rows) == sum(agreement[k] for k in ("tp", "fp", "fn", "tn"))
    assert json.loads((tmp_path / "runs" / "judged" / "stage1.json").read_text())["judge"] == judged
    assert "crm_on_policy_rollouts" in summary  # the CRM is trained as without a judge (oracle labels)
    crm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "runs" / "judged" / "crm")
    assert crm_tokenizer.model_max_length == 256  # what stages 3, 5 and 6 cut pairs to


def test_text_is_written_whole_or_not_at_all(stage1, tmp_path, monkeypatch):
    """write_text_atomic (eval.md, examples.md, every JSON file) writes a temporary file and renames it: a write
    killed before the rename leaves the previous file as it was, and a finished one leaves no temporary file."""
    path = tmp_path / "eval.md"
    stage1.write_text_atomic(path, "old table")
    assert path.read_text() == "old table" and [p.name for p in tmp_path.iterdir()] == ["eval.md"]

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(stage1.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        stage1.write_json_atomic(path, {"new": "table"})
    assert path.read_text() == "old table"  # untouched: the half-done write went to eval.md.tmp
