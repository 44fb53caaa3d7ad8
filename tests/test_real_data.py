"""The real-checkpoint path, offline: a user's JSONL dataset (own column names, image files) and judged
CRM data go through stages 1-4, with local folders standing in for hub checkpoints."""
import json

import pytest
from PIL import Image

from adapters import real_data
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
    data = real_data.load_real_dataset(real_config(user_files, tiny_run))  # no test split in the file: 5 % held out
    assert set(data) == {"train", "test"} and len(data["train"]) + len(data["test"]) == 8
    data.save_to_disk(str(user_files / "saved"))
    again = real_data.load_real_dataset(real_config(user_files, tiny_run, dataset=str(user_files / "saved")))
    assert again["test"]["q"] == data["test"]["q"]
    assert stage1.row_image(again["train"], 0, "img").mode == "RGB"


def test_real_data_without_crm_data_fails_before_training(user_files, tiny_run):
    with pytest.raises(SystemExit, match="--crm-data"):
        stage1.main(real_config(user_files, tiny_run, crm_data=None))


class JudgeEndpoint:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1 whose verdict is a hash of the prompt: consistent,
    inconsistent or an unparseable "maybe", the same every time it is asked. Records every request."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"payload": payload, "auth": self.headers.get("Authorization")})
                reply = verdict_for(payload["messages"][0]["content"])
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def verdict_for(prompt: str) -> str:
    import hashlib

    return ["consistent", "inconsistent", "maybe"][hashlib.sha256(prompt.encode()).digest()[0] % 3]


def test_real_data_with_a_url_judge_labels_the_policy_rollouts(user_files, tiny_run, monkeypatch):
    """Real data, no --crm-data: stage 1 samples the SFT policy's rollouts on train prompts, a judge endpoint
    labels them (unparseable replies counted and dropped), the CRM trains on them, and crm_data.jsonl holds them
    in the --crm-data format. The replies are cached under runs/<run>/: a rerun asks the endpoint nothing."""
    from adapters import judge as jd

    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    server = JudgeEndpoint()
    try:
        cfg = real_config(user_files, tiny_run, run="judged", crm_data=None, judge_url=server.url,
                          judge_model="judge-model", judge_api_key_env="TEST_JUDGE_KEY", skip_policy_sft=True,
                          crm_rollout_prompts=7, crm_rollout_samples=8, max_new_tokens=48)
        summary = stage1.main(cfg)
        run_dir = user_files / "runs" / "judged"
        rows = real_data.read_crm_jsonl(str(run_dir / "crm_data.jsonl"))
        judged = summary["judge"]
        assert "agreement" not in judged  # no rule oracle on real data
        questions = {f"What is {i} + 1?" for i in range(8)}
        assert rows and all(r["question"] in questions for r in rows)  # rollouts on the dataset's own prompts
        assert [r["label"] for r in rows] == [int(verdict_for(jd.judge_prompt(r)) == "consistent") for r in rows]
        assert judged["labelled"] == len(rows) and judged["rows"] == len(rows) + judged["unparseable"]
        asked = [r["payload"]["messages"][0]["content"] for r in server.requests]
        assert len(asked) == len(set(asked)) == judged["rows"] + 1  # each distinct rollout once, plus the check
        assert judged["unparseable"] == sum(verdict_for(p) == "maybe" for p in asked[1:])
        assert all(r["auth"] == "Bearer sk-test" and r["payload"]["model"] == "judge-model"
                   for r in server.requests)
        assert summary["crm"]["n"] == max(1, len(rows) // 20)  # trained on the judged rows, 5 % held out
        cached = (run_dir / "judge_cache.jsonl").read_text().splitlines()
        assert len(cached) == len(asked)  # every reply cached, "maybe" too (a reply, without a verdict in it)

        server.requests.clear()
        again = stage1.main(cfg)
        assert server.requests == [] and again["judge"] == judged  # resumed from the cache
    finally:
        server.close()
