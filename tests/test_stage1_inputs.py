"""Stage 1 refuses bad input before any model loads, with an error that names the flag, file, line or row; a rerun
that fails (early or late) leaves the earlier finished run as it was; every stage's --help explains its flags."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from adapters import real_data
from conftest import ROOT, load_stage

stage1 = load_stage("01_sft_rm.py")


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the errors below must come before one."""
    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    for name in ("load_policy", "load_crm", "build_tiny_policy", "build_tiny_crm"):
        monkeypatch.setattr(stage1, name, fail)


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("overrides, message", [
    (dict(sft_steps=0), r"--sft-steps 0: must be at least 1 \(or pass --skip-policy-sft\)"),
    (dict(sft_batch_size=0), "--sft-batch-size 0: must be at least 1"),
    (dict(n_train=20, sft_batch_size=32), "--sft-batch-size 32: more than the 20 training tasks"),
    (dict(n_test=0), "--n-test 0: must be at least 1"),
    (dict(eval_n=0), "--eval-n 0"),
    (dict(max_new_tokens=0), "--max-new-tokens 0"),
    (dict(warmup_steps=-1), "--warmup-steps -1"),
    (dict(crm_steps=0), "--crm-steps 0"),
    (dict(crm_batch_size=0), "--crm-batch-size 0"),
    (dict(crm_max_length=64), "--crm-max-length 64: must be at least 65"),
    (dict(crm_rollout_samples=0), "--crm-rollout-samples 0"),
    (dict(crm_rollout_prompts=-1), "--crm-rollout-prompts -1"),
    (dict(max_pixels=1000), "--max-pixels 1000: must be at least 3136"),
    (dict(sft_lr=float("nan")), "--sft-lr nan: must be a finite number above 0"),
    (dict(crm_lr=0.0), "--crm-lr 0.0"),
    (dict(crm_rollout_temperature=0.0), "--crm-rollout-temperature 0.0"),
    (dict(inconsistent_frac=1.5), "--inconsistent-frac 1.5: must be a share between 0 and 1"),
    (dict(image_size=90), "--image-size 90: must be a multiple of 28"),
    (dict(dtype="fp16"), "--dtype fp16: use auto, bf16 or fp32"),
    (dict(judge="a", judge_url="http://x/v1", judge_model="m"), "--judge and --judge-url both"),
    (dict(judge_url="http://x/v1"), "--judge-url and --judge-model go together"),
    (dict(judge="a", crm_data="c.jsonl"), "--crm-data is already labelled"),
    (dict(judge="a", crm_rollout_prompts=0), "--crm-rollout-prompts 0: must be at least 1"),
    (dict(dataset="d.jsonl", target_column="t"), "--crm-data .* or a judge"),
    (dict(dataset="d.jsonl", crm_data="c.jsonl"), "--target-column .* or --skip-policy-sft"),
])
def test_a_bad_flag_is_named_before_anything_is_written(tmp_path, no_models, overrides, message):
    cfg = stage1.Config(runs_dir=str(tmp_path / "runs"), device="cpu", **overrides)
    with pytest.raises(SystemExit, match=message):
        stage1.main(cfg)
    assert not (tmp_path / "runs").exists()  # nothing read or written


# ----------------------------------------------------------------------------- files
@pytest.fixture
def user(tmp_path):
    """Four images, a good data.jsonl (no test split: 5 % is held out) and a good judged.jsonl."""
    for i in range(4):
        Image.new("RGB", (56, 56), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    write_rows(tmp_path / "data.jsonl", rows)
    write_rows(tmp_path / "judged.jsonl", [{"question": "q", "thinking": "So the answer is 1.", "answer": a,
                                            "label": int(a == "1")} for a in ("1", "2", "1")])
    return tmp_path


def write_rows(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def real(user, **overrides):
    base = dict(runs_dir=str(user / "runs"), dataset=str(user / "data.jsonl"), crm_data=str(user / "judged.jsonl"),
                skip_policy_sft=True, device="cpu")
    return stage1.Config(**{**base, **overrides})


def good_rows(n=4):
    return [{"image": f"{i % 4}.png", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]


@pytest.mark.parametrize("lines, message", [
    ([], r"judged.jsonl: 0 labelled rows"),
    ([{"question": "q", "thinking": "t", "answer": "1", "label": 1}], r"judged.jsonl: 1 labelled rows"),
    ([{"question": "q", "thinking": "t", "answer": "1", "label": 1}] * 3, "3 labelled rows, 3 of them consistent"),
    (['{"question": "q"', "{}"], r"judged.jsonl, line 1: JSONDecodeError"),
    (["3"], r"judged.jsonl, line 1: TypeError"),
])
def test_bad_crm_data_is_named_before_any_model_loads(user, no_models, lines, message):
    write_rows(user / "judged.jsonl", lines)
    with pytest.raises(SystemExit, match=message):
        stage1.main(real(user))


def test_a_byte_that_is_not_utf8_in_crm_data_names_the_file_and_line(user, no_models):
    good = json.dumps({"question": "q", "thinking": "So the answer is 1.", "answer": "1", "label": 1})
    (user / "judged.jsonl").write_bytes(f"{good}\n{good}\n".encode() + b'{"question": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"--crm-data .*judged.jsonl, line 3: byte 0xe9 is not UTF-8 text "
                                         r"\(invalid continuation byte\); save the file as UTF-8"):
        stage1.main(real(user))


def test_missing_crm_data_file(user, no_models):
    with pytest.raises(SystemExit, match=r"--crm-data .*nothing.jsonl: no such file"):
        stage1.main(real(user, crm_data=str(user / "nothing.jsonl")))


@pytest.mark.parametrize("rows, message", [
    ([], r"--dataset .*data.jsonl: the file holds no rows"),
    (["", "   "], r"--dataset .*data.jsonl: the file holds no rows"),
    (good_rows(1) + ['{"image": "1.png", "question": '], r"--dataset .*data.jsonl, line 2: not valid JSON"),
    (good_rows(2) + ["[1, 2]"], r"--dataset .*data.jsonl, line 3: not a JSON object"),
    (good_rows(2) + [{"image": "1.png", "answer": "1"}],
     r"line 3: no column 'question'. Columns: \['image', 'answer'\]"),
    (good_rows(1) + [{"image": None, "question": "q", "answer": "1"}], r"line 2: column 'image' holds None"),
    (good_rows(1), r"split 'train' has 1 row\(s\) and there is no 'test' split"),
])
def test_a_broken_or_empty_dataset_names_the_file_and_line(user, no_models, rows, message):
    write_rows(user / "data.jsonl", rows)
    with pytest.raises(SystemExit, match=message):
        stage1.main(real(user))


def test_every_image_is_opened_before_any_model_loads(user, no_models):
    (user / "bad.png").write_text("not an image")
    rows = good_rows(30)
    rows[17]["image"] = "bad.png"
    write_rows(user / "data.jsonl", rows)
    with pytest.raises(SystemExit, match=r"dataset split '(train|test)', row \d+: cannot read the image in column "
                                         r"'image' .*bad.png"):
        stage1.main(real(user))
    rows[17] = {**good_rows(30)[17], "question": "  "}
    write_rows(user / "data.jsonl", rows)
    with pytest.raises(SystemExit, match=r"split '(train|test)', row \d+: column 'question' is empty"):
        stage1.main(real(user))


def test_a_bad_image_names_the_line_of_the_jsonl_file(user, no_models):
    """The split is shuffled (5 % held out), so its row number is not the file's line: that is named too."""
    (user / "bad.png").write_text("not an image")
    rows = good_rows(30)
    rows[17]["image"] = "bad.png"
    write_rows(user / "data.jsonl", rows)
    with pytest.raises(SystemExit, match=r"--dataset .*data.jsonl, line 18: dataset split '(train|test)', "
                                         r"row \d+: cannot read the image"):
        stage1.main(real(user))


def test_a_batch_larger_than_the_train_split(user, no_models):
    write_rows(user / "data.jsonl", [{**r, "t": "<think>a</think><answer>1</answer>"} for r in good_rows(8)])
    with pytest.raises(SystemExit, match="--sft-batch-size 32: the train split has only 7 rows"):
        stage1.main(real(user, skip_policy_sft=False, target_column="t"))


def test_a_dataset_split_that_does_not_exist(user, no_models):
    real_data.load_real_dataset(real(user)).save_to_disk(str(user / "saved"))  # splits train and test
    with pytest.raises(SystemExit, match=r"no split 'validation' \(splits: \['train', 'test'\]\)"):
        stage1.main(real(user, dataset=str(user / "saved"), train_split="validation"))


# ----------------------------------------------------------------------------- a rerun never breaks a finished run
TINY = dict(n_train=20, n_test=5, sft_steps=3, sft_batch_size=4, crm_steps=3, crm_batch_size=8, eval_n=2,
            crm_rollout_prompts=2, crm_rollout_samples=2, max_new_tokens=8, device="cpu")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    runs = tmp_path_factory.mktemp("finished")
    stage1.main(stage1.Config(run="done", runs_dir=str(runs), **TINY))
    return runs / "done"


def fingerprint(run_dir) -> dict:
    """sha256 of every file of a run, by relative path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def copy_of_finished(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "done")
    return tmp_path / "done"


def test_a_rerun_failing_early_or_late_leaves_the_finished_run(copy_of_finished, monkeypatch):
    run_dir = copy_of_finished
    before = fingerprint(run_dir)
    cfg = stage1.Config(run="done", runs_dir=str(run_dir.parent), **{**TINY, "seed": 1})
    (run_dir.parent / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="empty.jsonl: 0 labelled rows"):  # early: a bad input
        stage1.main(stage1.Config(**{**vars(cfg), "crm_data": str(run_dir.parent / "empty.jsonl")}))
    assert fingerprint(run_dir) == before

    def killed(*args, **kwargs):
        raise RuntimeError("killed during CRM training")

    monkeypatch.setattr(stage1, "train_crm", killed)  # late: after data, policy SFT and the CRM data
    with pytest.raises(RuntimeError, match="killed"):
        stage1.main(cfg)
    assert (run_dir / "stage1.new" / "policy_sft").is_dir()  # the new run's work is apart
    after = fingerprint(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith("stage1.new/")} == before
    assert json.loads((run_dir / "stage1.json").read_text())["config"]["seed"] == 0


def test_a_complete_rerun_replaces_everything(copy_of_finished):
    run_dir = copy_of_finished
    before = fingerprint(run_dir)
    (run_dir / "crm_data.jsonl").write_text("stale: an earlier run's judged rows\n")
    (run_dir / "stage1.new").mkdir()  # what a killed attempt left
    (run_dir / "stage1.new" / "junk").write_text("x")
    summary = stage1.main(stage1.Config(run="done", runs_dir=str(run_dir.parent), **{**TINY, "seed": 1}))
    after = fingerprint(run_dir)
    assert json.loads((run_dir / "stage1.json").read_text()) == summary and summary["config"]["seed"] == 1
    assert not (run_dir / "stage1.new").exists() and not (run_dir / "crm_data.jsonl").exists()
    assert set(after) == set(before)  # the same outputs, all of them new
    assert after["policy_sft/model.safetensors"] != before["policy_sft/model.safetensors"]


# ----------------------------------------------------------------------------- --help
def test_help_shows_each_field_comment_and_default():
    """`python 05_grpo_train.py --help` (run as a user would; it loads no model) shows, for every Config field, the
    one-line comment written beside it in the source and its default."""
    import dataclasses

    stage5 = load_stage("05_grpo_train.py")
    out = subprocess.run([sys.executable, "05_grpo_train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    squashed = "".join(out.stdout.split())  # argparse wraps lines (and may break after a hyphen)
    comments = stage1.field_comments(stage5.Config)
    for field in dataclasses.fields(stage5.Config):
        assert comments.get(field.name), f"{field.name} has no comment in 05_grpo_train.Config"
        shown = comments[field.name] + ("" if field.type is bool else f" (default: {field.default})")
        assert "".join(shown.split()) in squashed, field.name
    assert stage1.field_comments(stage1.Config)["sft_steps"] == "optimiser steps of policy SFT"
    assert stage1.field_comments(stage1.Config)["device"] == "where models train"  # its default holds code
    help_text = "".join(subprocess.run([sys.executable, "01_sft_rm.py", "-h"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120).stdout.split())
    assert "linearwarm-up,thencosinedecayto10%(default:20)" in help_text  # a "%" in a comment survives argparse


def test_optional_int_fields_parse_as_int():
    stage3 = load_stage("03_rewards.py")
    assert stage1.parse_config(stage3.Config, "", ["--crm-max-length", "1024"]).crm_max_length == 1024
    assert stage1.parse_config(stage3.Config, "", []).crm_max_length is None
