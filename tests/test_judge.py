"""The LLM judge, offline and bounded in time: a tiny random causal LM (a tokenizer without a pad token) for the
local path; an HTTP server on 127.0.0.1 for the URL path (good reply, 429 then success, malformed replies, a
timeout, an error that must not be retried) and a killed labelling run that resumes from its cache."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from adapters import judge as jd
from adapters import real_data
from conftest import load_stage



def judged_row(i: int) -> dict:
    """Row i: the thinking counts to n = i % 4 + 1 (lengths differ), the answer is 7i % 5 + 1; oracle: equal."""
    n, answer = i % 4 + 1, (7 * i) % 5 + 1
    steps = ", ".join(str(k) for k in range(1, n + 1))
    return {"question": f"row {i}: how many red shapes are there?", "answer": str(answer),
            "thinking": f"I count the red shapes: {steps}. So the answer is {n}.", "oracle": int(n == answer)}


ROWS = [judged_row(i) for i in range(10)]


def test_parse_verdict_reads_the_first_verdict_word_and_never_guesses():
    assert [jd.parse_verdict(t) for t in ("Consistent.", " inconsistent", "INCONSISTENT: the answer differs",
                                          "The answer is not consistent with the reasoning")] == [1, 0, 0, 0]
    # a reasoning judge: its <think> is skipped; cut off inside it, there is no verdict
    assert jd.parse_verdict("<think>consistent? no...</think>Inconsistent") == 0
    assert jd.parse_verdict("<think>it looks consistent") is None
    assert [jd.parse_verdict(t) for t in ("maybe", "", None, "consistently wrong", "yes")] == [None] * 5


def test_judge_prompt_holds_the_row_and_asks_for_agreement_not_correctness():
    prompt = jd.judge_prompt(ROWS[3])
    assert prompt.index(ROWS[3]["question"]) < prompt.index(ROWS[3]["thinking"]) < prompt.index(
        f"Final answer: {ROWS[3]['answer']}")
    assert "Do not judge whether the answer is correct" in prompt
    assert prompt.rstrip().endswith("Reply with one word: consistent or inconsistent.")


def test_agreement_hand_computed():
    # judge [1, 1, 0, 0, 1] vs oracle [1, 0, 0, 1, 1]: tp = rows 0, 4; fp = row 1; tn = row 2; fn = row 3
    # accuracy = (tp + tn) / n = (2 + 1) / 5 = 0.6
    result = jd.agreement([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert result == {"accuracy": 0.6, "tp": 2, "fp": 1, "fn": 1, "tn": 1, "n": 5}


# ----------------------------------------------------------------------------- the local path
TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def build_tiny_judge(folder, with_template: bool) -> None:
    """A 2-layer random Llama and a word-level tokenizer with NO pad token (and, without a template, no eos).

    The output layer is zero except the rows of "consistent" and "inconsistent": two random directions with the
    mean final hidden state of the ten judge prompts projected out, so their logits change sign from prompt to
    prompt. The greedy first token is the verdict word with the larger positive logit, or, when both are
    negative, [UNK] (id 0, the first of the zero logits; dropped when decoding): every kind of reply.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    prompts = [jd.judge_prompt(r) for r in ROWS]
    texts = [f"<user> {p} <assistant>" if with_template else f"{p}\nVerdict:" for p in prompts]
    words = sorted({w for t in texts + ["consistent inconsistent"] for w in re.findall(r"\w+|[^\w\s]+", t)})
    specials = ["[UNK]"] + (["</s>"] if with_template else [])
    vocab = {token: i for i, token in enumerate(specials + words)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]",
                                        eos_token="</s>" if with_template else None)
    if with_template:
        tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, pad_token_id=None,
                         eos_token_id=vocab.get("</s>"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        last = torch.cat([model.model(**tokenizer(t, return_tensors="pt")).last_hidden_state[:, -1]
                          for t in texts])  # (10, 32): after the final norm, what the output layer reads
        mean = last.mean(0) / last.mean(0).norm()  # (32,)
        model.lm_head.weight.zero_()
        for word in ("consistent", "inconsistent"):
            direction = torch.randn(32, generator=generator)
            model.lm_head.weight[vocab[word]] = 100 * (direction - (direction @ mean) * mean)
    model.save_pretrained(folder)


@pytest.fixture
def one_thread():
    """Ops this small run faster on one thread, and far faster when other jobs load the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[True, False], ids=["chat-template", "no-template-no-eos"])
def tiny_judge_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("judge")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    build_tiny_judge(folder, with_template=request.param)
    torch.set_num_threads(threads)
    return folder, request.param


def test_local_judge_without_pad_token_batches_like_one_by_one(tiny_judge_dir, one_thread):
    from transformers import AutoTokenizer

    folder, with_template = tiny_judge_dir
    assert AutoTokenizer.from_pretrained(folder).pad_token is None  # the trap: padding would crash
    one_by_one = jd.LocalJudge(str(folder), batch_size=1, max_new_tokens=1)
    batched = jd.LocalJudge(str(folder), batch_size=4, max_new_tokens=1)  # 10 prompts: batches of 4, 4, 2
    assert batched.tokenizer.pad_token == ("</s>" if with_template else "[UNK]")  # eos, else unk
    prompt = jd.judge_prompt(ROWS[0])
    if with_template:
        assert batched.chat_text(prompt) == f"<user> {prompt} <assistant>"
    else:
        assert batched.chat_text(prompt) == f"{prompt}\nVerdict:"
    prompts = [jd.judge_prompt(r) for r in ROWS]
    lengths = {len(batched.tokenizer(batched.chat_text(p))["input_ids"]) for p in prompts}
    assert len(lengths) > 1  # so batches are padded
    replies = batched.complete(prompts)
    assert replies == one_by_one.complete(prompts)
    verdicts = [jd.parse_verdict(r) for r in replies]
    assert {0, 1, None} <= set(verdicts), replies  # the fixture model gives every kind of reply

    labelled, stats = jd.label_rows(batched, ROWS, chunk_size=3)
    kept = [i for i, v in enumerate(verdicts) if v is not None]
    assert labelled == [{**ROWS[i], "label": verdicts[i]} for i in kept]  # unparseable: dropped, not guessed
    consistent = sum(verdicts[i] for i in kept)
    assert stats == {"rows": 10, "labelled": len(kept), "unparseable": 10 - len(kept), "consistent": consistent,
                     "inconsistent": len(kept) - consistent}

    one_by_one.max_new_tokens = batched.max_new_tokens = 6  # longer replies: still the same, token for token
    assert batched.complete(prompts) == one_by_one.complete(prompts)


def test_labelled_rows_are_crm_data(tmp_path):
    class Fixed:
        def complete(self, prompts):
            replies = {"row 1:": "consistent", "row 2:": "inconsistent"}
            return [next((r for tag, r in replies.items() if tag in p), "hmm") for p in prompts]

    labelled, stats = jd.label_rows(Fixed(), ROWS[:3])
    assert stats["unparseable"] == 1 and [r["label"] for r in labelled] == [1, 0]
    path = tmp_path / "crm_data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    read = real_data.read_crm_jsonl(str(path))
    assert read == [{k: r[k] for k in ("question", "thinking", "answer", "label")} for r in labelled]


# ----------------------------------------------------------------------------- the URL path
def chat(content) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                         "content": content}}]}


class JudgeServer:
    """An OpenAI-style /v1/chat/completions on 127.0.0.1. respond(payload, attempt) -> (status, body, delay):
    attempt counts the requests for the same prompt (1, 2, ...); body is a dict (sent as JSON) or bytes."""

    def __init__(self):
        self.requests, self.attempts, self.lock = [], {}, threading.Lock()
        self.respond = lambda payload, attempt: (200, chat("consistent"), 0.0)  # replaced per test
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = payload["messages"][0]["content"]
                with owner.lock:
                    owner.requests.append({"path": self.path, "payload": payload,
                                           "headers": dict(self.headers)})
                    owner.attempts[prompt] = attempt = owner.attempts.get(prompt, 0) + 1
                status, body, delay = owner.respond(payload, attempt)
                time.sleep(delay)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def url_judge(server, **overrides) -> jd.UrlJudge:
    """Small timeouts and waits: every URL test ends in about a second."""
    settings = dict(api_key_env="TEST_JUDGE_KEY", timeout=2.0, max_retries=3, backoff=0.01, workers=1)
    return jd.UrlJudge(server.url, "judge-model", **{**settings, **overrides})


def test_url_judge_good_reply(server, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    labelled, stats = jd.label_rows(url_judge(server), ROWS[:1])
    assert [r["label"] for r in labelled] == [1] and stats["unparseable"] == 0
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["payload"]["model"] == "judge-model" and request["payload"]["temperature"] == 0.0
    assert request["payload"]["messages"] == [{"role": "user", "content": jd.judge_prompt(ROWS[0])}]
    assert request["headers"]["Authorization"] == "Bearer sk-test"


def test_url_judge_retries_429_and_5xx_then_succeeds(server):
    script = {1: (429, {"error": "slow down"}, 0.0), 2: (503, {"error": "busy"}, 0.0)}  # attempt -> reply
    server.respond = lambda payload, attempt: script.get(attempt, (200, chat("inconsistent"), 0.0))
    judge = url_judge(server)
    assert judge.complete([jd.judge_prompt(ROWS[0])]) == ["inconsistent"]
    assert len(server.requests) == 3 and judge.requests == 3
    assert "Authorization" not in server.requests[0]["headers"]  # no key in the environment: no header


def test_url_judge_client_errors_raise_at_once(server):
    server.respond = lambda payload, attempt: (404, {"error": "model not found"}, 0.0)
    with pytest.raises(RuntimeError, match="HTTP 404.*model not found"):
        url_judge(server).complete(["anything"])
    assert len(server.requests) == 1  # a wrong model name is not retried


def test_url_judge_malformed_replies_are_counted_and_dropped(server, tmp_path):
    bodies = {"row 0:": b"this is not json", "row 1:": {"choices": []}, "row 2:": chat(None),
              "row 3:": chat("maybe"), "row 4:": chat("Consistent")}
    server.respond = lambda payload, attempt: (200, next(b for tag, b in bodies.items()
                                                         if tag in payload["messages"][0]["content"]), 0.0)
    cache = tmp_path / "cache.jsonl"
    labelled, stats = jd.label_rows(url_judge(server, cache_path=str(cache)), ROWS[:5])
    assert [r["question"] for r in labelled] == [ROWS[4]["question"]] and labelled[0]["label"] == 1
    assert stats["unparseable"] == 4 and len(server.requests) == 5  # malformed 200s are not retried
    # only real completions are cached ("maybe" is one, without a verdict); broken bodies would be asked again
    cached = sorted(json.loads(line)["reply"] for line in cache.read_text().splitlines())
    assert cached == ["Consistent", "maybe"]


def test_url_judge_timeout_is_retried_and_bounded(server):
    """The server takes 2 s where the client waits 0.3 s: waiting for it would take 2 s or more."""
    server.respond = lambda payload, attempt: (200, chat("consistent"), 2.0 if attempt == 1 else 0.0)
    judge = url_judge(server, timeout=0.3)
    started = time.time()
    assert judge.complete(["slow once"]) == ["consistent"]
    assert len(server.requests) == 2 and time.time() - started < 1.5  # 0.3 s timeout, then a fast retry

    server.respond = lambda payload, attempt: (200, chat("consistent"), 2.0)  # never in time
    started = time.time()
    with pytest.raises(RuntimeError, match="no reply after 2 attempts"):
        url_judge(server, timeout=0.3, max_retries=1).complete(["always slow"])
    assert time.time() - started < 1.5  # 2 x 0.3 s + a 0.01 s wait


def row_number(payload: dict) -> int:
    """Which of ROWS a request judges ("row 4: how many ..." in its prompt)."""
    return int(re.search(r"row (\d+):", payload["messages"][0]["content"]).group(1))


def test_killed_labelling_run_resumes_from_its_cache(server, tmp_path):
    def answer(payload, attempt):
        row = row_number(payload)
        if server.broken and row == 4:
            return 500, {"error": "down"}, 0.0
        return 200, chat("consistent" if row % 2 == 0 else "inconsistent"), 0.0

    server.broken, server.respond = True, answer
    cache = tmp_path / "cache.jsonl"
    rows = ROWS[:6]
    with pytest.raises(RuntimeError, match="rerun to resume"):
        jd.label_rows(url_judge(server, cache_path=str(cache), max_retries=1), rows)
    # rows 0-3 and 5 answered (the pool finishes its queue), row 4 failed twice: 7 requests, 5 cached replies
    assert len(server.requests) == 7 and len(cache.read_text().splitlines()) == 5
    # killed while writing the last line: half of it is on disk
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])

    server.broken, server.requests = False, []
    labelled, stats = jd.label_rows(url_judge(server, cache_path=str(cache)), rows)
    asked = sorted(row_number(r["payload"]) for r in server.requests)
    assert asked == [4, 5]  # only the rows missing from the cache: the failed one and the half-written one
    assert [r["label"] for r in labelled] == [1, 0, 1, 0, 1, 0] and stats["unparseable"] == 0
    assert len(jd.read_cache(cache)) == 6 and cache.read_text().endswith("\n")  # the broken tail was cut

    server.requests = []
    again, _ = jd.label_rows(url_judge(server, cache_path=str(cache)), rows)
    assert again == labelled and server.requests == []  # a third run asks nothing


# ----------------------------------------------------------------------------- stage 1's check of the judge
stage1 = load_stage("01_sft_rm.py")
EMBEDDED = dict(n_train=20, n_test=4, sft_steps=1, sft_batch_size=4, eval_n=2, crm_steps=2, crm_batch_size=8,
                crm_rollout_prompts=4, crm_rollout_samples=2, device="cpu")


@pytest.mark.parametrize("body", [b"<!doctype html><html><body>Welcome to nginx!</body></html>",
                                  chat("Sure! Here is my analysis of the reasoning.")],
                         ids=["html-page", "chat-without-verdict"])
def test_an_endpoint_that_answers_junk_is_refused_before_any_model(server, tmp_path, monkeypatch, body):
    def fail(*args, **kwargs):
        pytest.fail("a model was built or loaded before the judge was checked")

    for name in ("load_policy", "load_crm", "build_tiny_policy", "build_tiny_crm", "train_bpe"):
        monkeypatch.setattr(stage1, name, fail)
    server.respond = lambda payload, attempt: (200, body, 0.0)
    cfg = stage1.Config(run="junk", runs_dir=str(tmp_path), judge_url=server.url, judge_model="judge-model",
                        **EMBEDDED)
    expected = "with no verdict" if isinstance(body, dict) else "a body that is not a chat completion"
    with pytest.raises(SystemExit, match=f"--judge-url {server.url} --judge-model judge-model: asked to "
                                         f"judge one row, it answered .*{expected}"):
        stage1.main(cfg)
    assert len(server.requests) == 1 and not (tmp_path / "junk" / "stage1.json").exists()

    server.respond = lambda payload, attempt: (200, chat("Consistent."), 0.0)  # the endpoint fixed
    stage1.check_judge(cfg, tmp_path / "junk")  # a cached reply without a verdict is not taken: asked again
    assert len(server.requests) == 2


def test_rollouts_with_nothing_to_parse_are_not_blamed_on_the_judge(server, tiny_run, tmp_path):
    """--max-new-tokens 2 leaves no room for <think>..</think><answer>..</answer>: the judge is asked nothing
    (but the check) and the error says why, rather than report an agreement on 0 rows and exit 0."""
    cfg = stage1.Config(run="short", runs_dir=str(tmp_path), policy=str(tiny_run["dir"] / "policy_sft"),
                        skip_policy_sft=True, max_new_tokens=2, judge_url=server.url,
                        judge_model="judge-model", **EMBEDDED)
    with pytest.raises(SystemExit, match=r"none of the SFT policy's rollouts \(--crm-rollout-prompts 4 x "
                                         r"--crm-rollout-samples 2\) has a <think>...</think><answer>..."
                                         r"</answer> to judge within --max-new-tokens 2. Raise"):
        stage1.main(cfg)
    assert len(server.requests) == 1 and not (tmp_path / "short" / "stage1.json").exists()

    server.respond = lambda payload, attempt: (200, chat("maybe"), 0.0)
    with pytest.raises(SystemExit, match="gave no verdict for any of the 3 SFT-policy rollouts"):
        stage1.judge_rows(cfg, ROWS[:3], tmp_path / "short")
