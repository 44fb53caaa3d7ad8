"""An LLM judge that labels (question, thinking, answer) consistent or inconsistent: the CRM's training data.

The paper trains its CRM on ~90K policy rollouts labelled by GPT-5. This module is that labeller, with
two back ends that share one prompt and one parser:

    judge = LocalJudge("Qwen/Qwen2.5-7B-Instruct", device="cuda", dtype=torch.bfloat16)   # transformers
    judge = UrlJudge("http://localhost:8000/v1", "my-model", cache_path="runs/x/judge_cache.jsonl")
    labelled, stats = label_rows(judge, rows)    # rows: {question, thinking, answer, ...}
    agreement([r["label"] for r in labelled], [r["oracle"] for r in labelled])   # where a ground truth exists

Labelled rows are the input rows plus "label" (1 consistent, 0 inconsistent): the --crm-data JSONL format
that real_data.read_crm_jsonl reads. A reply with no verdict in it is counted (stats["unparseable"]) and
the row dropped, never guessed.

The verdict is read from the judge's generated text (greedy, a few tokens), not from the log-probabilities
of the two verdict words: one parser for both back ends, and it also works for judges that reason before
answering (their <think>...</think> is skipped) and for endpoints that return no log-probabilities.
"""
import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import torch

JUDGE_PROMPT = """You check whether a model's final answer follows from its own reasoning.

Question: {question}

Reasoning: {thinking}

Final answer: {answer}

The final answer is CONSISTENT if it is what the reasoning concludes, or follows directly from it. It is \
INCONSISTENT if the reasoning concludes something else, contradicts it, or does not lead to it at all.
Do not judge whether the answer is correct: a wrong answer that follows from wrong reasoning is consistent, \
and a right answer that the reasoning does not support is inconsistent.
Reply with one word: consistent or inconsistent."""

VERDICT_RE = re.compile(r"\b(not\s+consistent|inconsistent|consistent)\b", re.IGNORECASE)


def judge_prompt(row: dict) -> str:
    """JUDGE_PROMPT filled with one row's question, thinking and answer."""
    return JUDGE_PROMPT.format(question=str(row["question"]).strip(), thinking=str(row["thinking"]).strip(),
                               answer=str(row["answer"]).strip())


def parse_verdict(text: str | None) -> int | None:
    """1 consistent, 0 inconsistent, None when the reply holds no verdict. The first verdict word decides.

    A reasoning judge's <think>...</think> is skipped; an unclosed <think> (cut off) has no verdict.
    Example: parse_verdict("Consistent.") -> 1; parse_verdict("<think>consistent?</think> Inconsistent") -> 0;
             parse_verdict("not consistent") -> 0; parse_verdict("maybe") -> None.
    """
    if text is None:
        return None
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL)
    if "<think>" in text:
        return None
    found = VERDICT_RE.search(text)
    if found is None:
        return None
    return int(found.group(1).lower() == "consistent")


# ----------------------------------------------------------------------------- a local model (transformers)
class LocalJudge:
    """An instruct model through transformers: chat template, left-padded batches, greedy decoding.

    Prompts are sorted by length before batching (less padding); replies come back in the input order.
    A tokenizer without a pad token (Llama-3, Mistral) gets its eos (else unk, else id 0) as the pad: any id
    works, because left-padded positions are masked out and generation starts after the last real token.
    """

    def __init__(self, model_name_or_path: str, device: str = "cpu", dtype=torch.float32,
                 batch_size: int = 16, max_new_tokens: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, self.batch_size, self.max_new_tokens = device, batch_size, max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            tok = self.tokenizer
            tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
        self.model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype).to(device).eval()
        self.eos_token_id = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id

    def chat_text(self, prompt: str) -> str:
        """The text the model reads: its chat template around one user turn, or the bare prompt + "Verdict:".

        enable_thinking=False asks templates that know it (Qwen3) for a direct reply; others ignore it.
        """
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        return f"{prompt}\nVerdict:"

    @torch.no_grad()
    def complete(self, prompts: list[str]) -> list[str]:
        """The greedy reply (up to max_new_tokens) to every prompt, in order.

        Plain greedy: a fresh GenerationConfig, so a checkpoint's sampling defaults (temperature, top_p,
        repetition_penalty in its generation_config.json) do not apply.
        """
        from transformers import GenerationConfig

        greedy = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=self.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        texts = [self.chat_text(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        replies = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True,
                                   add_special_tokens=not self.tokenizer.chat_template,  # templates add BOS
                                   return_token_type_ids=False).to(self.device)
            out = self.model.generate(**batch, generation_config=greedy)  # (B, T + new)
            new = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, reply in zip(rows, new):
                replies[i] = reply
        return replies


# ----------------------------------------------------------------------------- an OpenAI-compatible endpoint
def read_cache(path: Path) -> dict[str, str]:
    """key -> reply from a JSONL cache. A half-written last line (a killed run) is cut off the file first."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    cache = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                cache[record["key"]] = record["reply"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}, line {number}: {error!r}; delete the line or the file.")
    return cache


def reply_text(data) -> str | None:
    """choices[0].message.content of a chat completion, or None when the body does not have one."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class UrlJudge:
    """POST {base_url}/chat/completions with the standard library, retried, cached on disk.

    Retries, with waits backoff x 2^attempt (capped at max_backoff; longer if the server sends Retry-After),
    on HTTP 429 and 5xx, timeouts and dropped connections; other HTTP errors (a wrong model name, a wrong key)
    raise at once with the server's message. After max_retries retries it raises: the replies so far are in
    the cache, and a rerun asks only for the rest. The cache is a JSONL file keyed by sha256 of (model,
    prompt), one line appended per reply; a body that is not a chat completion gives None and is not cached.
    The key comes from the environment variable api_key_env (no Authorization header when it is unset).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 5, cache_path: str | None = None, backoff: float = 1.0,
                 max_backoff: float = 30.0, temperature: float | None = 0.0, max_tokens: int | None = None,
                 workers: int = 4):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env)
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_tokens, self.workers = temperature, max_tokens, workers
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache = read_cache(self.cache_path) if self.cache_path else {}
        self.lock = threading.Lock()
        self.requests = 0  # HTTP attempts made by this object (retries included)

    def key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, prompt]).encode("utf-8")).hexdigest()

    def post(self, prompt: str):
        """The decoded JSON body of one chat completion (None if it is not JSON), retrying as the class
        says."""
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        body |= {"temperature": self.temperature} if self.temperature is not None else {}
        body |= {"max_tokens": self.max_tokens} if self.max_tokens is not None else {}
        headers = {"Content-Type": "application/json"}
        headers |= {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        for attempt in range(self.max_retries + 1):
            wait = self.backoff * 2 ** attempt
            with self.lock:
                self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    return None
            except urllib.error.HTTPError as error:
                if error.code != 429 and error.code < 500:
                    raise RuntimeError(f"{self.url}: HTTP {error.code}: {error.read()[:500]!r}") from error
                last = f"HTTP {error.code}"
                retry_after = error.headers.get("Retry-After", "")
                wait = max(wait, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else wait
            # timeouts, refused or dropped connections (URLError too)
            except (OSError, HTTPException) as error:
                last = repr(error)
            if attempt < self.max_retries:
                time.sleep(min(wait, self.max_backoff))
        cached = f" Replies so far are in {self.cache_path}; rerun to resume." if self.cache_path else ""
        raise RuntimeError(f"{self.url}: no reply after {self.max_retries + 1} attempts "
                           f"(last: {last}).{cached}")

    def ask(self, prompt: str) -> str | None:
        """One reply, from the cache or the endpoint (then appended to the cache)."""
        key = self.key(prompt)
        if key in self.cache:
            return self.cache[key]
        reply = reply_text(self.post(prompt))
        if reply is not None:
            with self.lock:
                self.cache[key] = reply
                if self.cache_path:
                    with self.cache_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"key": key, "reply": reply}) + "\n")
        return reply

    def complete(self, prompts: list[str]) -> list[str | None]:
        """The reply to every prompt, in order (None: not a chat completion); repeated prompts asked once."""
        distinct = list(dict.fromkeys(prompts))
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            replies = dict(zip(distinct, pool.map(self.ask, distinct)))
        return [replies[p] for p in prompts]


# ----------------------------------------------------------------------------- labelling and agreement
def label_rows(judge, rows: list[dict], chunk_size: int = 256) -> tuple[list[dict], dict]:
    """Judge every row; keep those with a verdict, as the row plus "label" (0/1; replaces any "label" it had).

    judge: anything with complete(prompts) -> replies (LocalJudge, UrlJudge). Rows go in chunks of chunk_size,
    so progress is printed and a URL judge's cache grows as the run goes.
    stats: {"rows", "labelled", "unparseable", "consistent", "inconsistent"}.
    """
    from tqdm import tqdm

    for i, row in enumerate(rows):
        if any(row.get(k) is None for k in ("question", "thinking", "answer")):
            raise ValueError(f"row {i} needs question, thinking and answer; it has {sorted(row)}.")
    replies = []
    for start in tqdm(range(0, len(rows), chunk_size), desc="judging"):
        replies += judge.complete([judge_prompt(r) for r in rows[start: start + chunk_size]])
    labelled = []
    for row, reply in zip(rows, replies):
        verdict = parse_verdict(reply)
        if verdict is not None:
            labelled.append({**row, "question": str(row["question"]), "thinking": str(row["thinking"]),
                             "answer": str(row["answer"]), "label": verdict})
    consistent = sum(r["label"] for r in labelled)
    stats = {"rows": len(rows), "labelled": len(labelled), "unparseable": len(rows) - len(labelled),
             "consistent": consistent, "inconsistent": len(labelled) - consistent}
    return labelled, stats


def agreement(labels: list[int], oracle_labels: list[int]) -> dict:
    """Accuracy of the judge against a ground truth, and the confusion counts ("consistent" is positive).

    Example: labels [1, 1, 0, 0, 1], oracle [1, 0, 0, 1, 1] -> tp 2, fp 1, fn 1, tn 1, accuracy 0.6.
    """
    if len(labels) != len(oracle_labels):
        raise ValueError(f"{len(labels)} labels against {len(oracle_labels)} oracle labels.")
    pairs = [(bool(a), bool(b)) for a, b in zip(labels, oracle_labels)]
    counts = {"tp": sum(a and b for a, b in pairs), "fp": sum(a and not b for a, b in pairs),
              "fn": sum(b and not a for a, b in pairs), "tn": sum(not a and not b for a, b in pairs)}
    return {"accuracy": (counts["tp"] + counts["tn"]) / max(1, len(pairs)), **counts, "n": len(pairs)}
