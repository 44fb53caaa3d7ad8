"""The real-checkpoint path, offline: a user's JSONL dataset (own column names, image files) and judged
CRM data go through stages 1-4, with local folders standing in for hub checkpoints."""
import json

import pytest
from PIL import Image

from conftest import load_stage

stage1, stage2, stage3, stage4 = (load_stage(f) for f in ("01_sft_rm.py", "02_rollout.py", "03_rewards.py",
                                                          "04_hras.py"))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, tiny_run):
    """my_tasks.jsonl with columns img / q / a / target and images in a subfolder; judged.jsonl for the CRM."""
    folder = tmp_path_factory.mktemp("user")
    (folder / "images").mkdir()
    rows = []
    for i in range(8):
        Image.effect_noise((56 + 28 * (i % 2), 56), 40 + i).convert("RGB").save(folder / "images" / f"{i}.png")
        rows.append({"img": f"images/{i}.png", "q": f"What is {i} + 1?", "a": str(i + 1),
                     "target": f"<think>{i} plus one is {i + 1}.</think><answer>{i + 1}</answer>"})
    (folder / "my_tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    judged = [{"question": "What is 1 + 1?", "thinking": "1 plus one is 2.", "answer": "2", "label": "consistent"},
              {"question": "What is 1 + 1?", "thinking": "1 plus one is 2.", "answer": "3", "label": "inconsistent"}] * 10
    (folder / "judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in judged))
    return folder


def real_config(user_files, tiny_run, **overrides) -> "stage1.Config":
    base = dict(run="real", runs_dir=str(user_files / "runs"), dataset=str(user_files / "my_tasks.jsonl"),
                image_column="img", question_column="q", answer_column="a", target_column="target",
                policy=str(tiny_run["dir"] / "policy_sft"), crm=str(tiny_run["dir"] / "crm"),
                crm_data=str(user_files / "judged.jsonl"), sft_steps=3, sft_batch_size=4, crm_steps=3,
                crm_batch_size=8, eval_n=2, max_new_tokens=8, device="cpu")
    return stage1.Config(**{**base, **overrides})


def test_jsonl_dataset_with_own_columns_runs_stages_1_to_4(user_files, tiny_run):
    summary = stage1.main(real_config(user_files, tiny_run))
    assert summary["policy_check"]["oracle_inconsistency_rate"] is None  # no rule oracle for real data
    assert summary["crm"]["n"] == 1  # 5 % of 20 judged rows held out (at least one)
    runs = str(user_files / "runs")
    stage2.main(stage2.Config(run="real", runs_dir=runs, n_prompts=2, group_size=2, max_new_tokens=8, device="cpu"))
    rows = stage3.main(stage3.Config(run="real", runs_dir=runs, device="cpu"))
    assert all(r["oracle_consistent"] is None for row in rows for r in row["rewards"])
    assert {row["answer"] for row in rows} <= {str(i + 1) for i in range(8)}  # answers come from column "a"
    assert len(stage4.main(stage4.Config(run="real", runs_dir=runs))) == 2


def test_a_saved_dataset_folder_loads_too(user_files, tiny_run):
    data = stage1.load_real_dataset(real_config(user_files, tiny_run))  # no test split in the file: 5 % held out
    assert set(data) == {"train", "test"} and len(data["train"]) + len(data["test"]) == 8
    data.save_to_disk(str(user_files / "saved"))
    again = stage1.load_real_dataset(real_config(user_files, tiny_run, dataset=str(user_files / "saved")))
    assert again["test"]["q"] == data["test"]["q"]
    assert stage1.row_image(again["train"], 0, "img").mode == "RGB"


def test_real_data_without_crm_data_fails_before_training(user_files, tiny_run):
    with pytest.raises(SystemExit, match="--crm-data"):
        stage1.main(real_config(user_files, tiny_run, crm_data=None))
