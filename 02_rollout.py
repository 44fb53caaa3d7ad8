"""Stage 2: rollouts. G sampled completions per prompt, from a sampler written by hand.

The model is transformers'; the loop is ours (GRPO-Zero / nanochat style):

  1. prefill     one forward over the left-padded prompts (image + text), with explicit mRoPE
                 positions from model.model.get_rope_index -> a KV cache and the last logits.
  2. expand      copy each prompt's cache row to the G members of its group (repeat_interleave),
                 so the vision tower and the prompt run once per prompt, not G times.
  3. decode      one token per step through the cache: mask forbidden ids (vision special tokens:
                 sampling one would crash the next forward), temperature, top-k, top-p, sample;
                 position = last + 1 on all three mRoPE axes.
  4. stop        a row is finished after its first stop token (<|im_end|> or <|endoftext|>); the
                 completion mask covers tokens up to and including it, padding after it.

Each completion records its token ids, the log-prob of each token under softmax(logits / T)
(the same quantity stage 5 recomputes: before top-k/top-p and the forbidden-token mask, which
only steer the sampler), its length, whether it ran out of budget (truncated), and its text.

Reads:  runs/<run>/policy_sft/ (or --policy), runs/<run>/data/ and stage1.json (from 01_sft_rm.py).
Writes: runs/<run>/rollouts.jsonl, one row per prompt with its G completions.
Run:    python 02_rollout.py [--n-prompts 16 --group-size 8 --temperature 1.0]
"""
import dataclasses
import importlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1 = importlib.import_module("01_sft_rm")


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/
    runs_dir: str = "runs"  # parent folder of all runs
    policy: str | None = None  # checkpoint to sample from; None = runs/<run>/policy_sft
    split: str = "train"  # data split to take prompts from
    n_prompts: int = 16  # prompts to roll out
    group_size: int = 8  # G: completions per prompt
    prompts_per_batch: int = 16  # prompts prefilled together (batch = prompts_per_batch * G rows)
    max_new_tokens: int = 64  # completion budget; rows that reach it are "truncated"
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set with this much probability (1 = off)
    seed: int = 0  # seeds prompt choice and sampling
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the policy runs


@dataclass
class Rollout:
    """One sampled completion of one prompt."""
    token_ids: list[int]  # the completion, stop token included, no padding
    logprobs: list[float]  # log p(token) under softmax(logits / T), one per token
    length: int  # number of tokens
    truncated: bool  # no stop token within max_new_tokens
    text: str  # decoded, special tokens skipped


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed the cache argument `past_key_values` -> `cache`; accept both."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (N, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (N, V)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before it already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_completions(model, prompt: dict, group_size: int, max_new_tokens: int, stop_ids: list[int],
                       forbidden_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, generator: torch.Generator | None = None, stop_check_every: int = 4):
    """Sample group_size completions for each of the B prompts; rows k*G ... k*G+G-1 belong to prompt k.

    prompt: encode_prompts output on the model's device (left padded).
    Returns ids (N, L), mask (N, L), logprobs (N, L) and truncated (N,), with N = B * G.
    """
    B, G = prompt["input_ids"].shape[0], group_size
    positions, _ = model.model.get_rope_index(
        prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"], attention_mask=prompt["attention_mask"])  # (3, B, P)
    out = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)  # 1. prefill
    cache = out.cache if "cache" in out else out.past_key_values  # the output's name follows cache_kwarg
    cache.batch_repeat_interleave(G)  # 2. (B, ...) -> (B * G, ...): each prompt's cache copied G times
    logits = out.logits[:, -1].repeat_interleave(G, dim=0)  # (N, V)
    attention_mask = prompt["attention_mask"].repeat_interleave(G, dim=0)  # (N, P)
    next_position = positions[:, :, -1:].repeat_interleave(G, dim=1) + 1  # (3, N, 1): left padding -> last is real

    N, device = B * G, logits.device
    ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, L)
    mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)  # (N, L)
    logprobs = torch.zeros((N, max_new_tokens), device=device)  # (N, L)
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    stop, cache_name = torch.tensor(stop_ids, device=device), cache_kwarg(model)
    for t in range(max_new_tokens):  # 3. decode
        logits = logits.float()  # (N, V)
        recorded = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)  # (N, V)
        allowed = logits.clone()
        allowed[:, forbidden_ids] = float("-inf")
        if temperature > 0:
            allowed = filter_top_k_top_p(allowed / temperature, top_k, top_p)
            token = torch.multinomial(torch.softmax(allowed, dim=-1), 1, generator=generator).squeeze(-1)  # (N,)
        else:
            token = allowed.argmax(dim=-1)  # (N,)
        token = torch.where(finished, pad_id, token)  # finished rows only pad
        ids[:, t], mask[:, t] = token, (~finished).long()
        logprobs[:, t] = recorded.gather(-1, token.unsqueeze(-1)).squeeze(-1) * (~finished)
        finished = finished | torch.isin(token, stop)  # 4. the stop token itself stays in the completion
        if (t + 1) % stop_check_every == 0 and bool(finished.all()):  # a host sync only every k steps
            break
        if t + 1 == max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(N, 1)], dim=1)  # (N, P + t + 1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask, position_ids=next_position,
                    use_cache=True, **{cache_name: cache})
        logits, next_position = out.logits[:, -1], next_position + 1
    length = int(mask.sum(dim=1).max())  # drop columns that only hold padding
    return ids[:, :length], mask[:, :length], logprobs[:, :length], ~finished


def to_rollouts(processor, ids: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor,
                truncated: torch.Tensor) -> list[Rollout]:
    """Tensors of sample_completions -> one Rollout per row (padding removed, text decoded)."""
    rollouts = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        token_ids = ids[i, :n].tolist()
        rollouts.append(Rollout(token_ids=token_ids, logprobs=[round(x, 6) for x in logprobs[i, :n].tolist()],
                                length=n, truncated=bool(truncated[i]),
                                text=processor.tokenizer.decode(token_ids, skip_special_tokens=True)))
    return rollouts


def forbidden_token_ids(processor) -> list[int]:
    """Vision special tokens (and <|im_start|>) may never be sampled."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in stage1.VISION_TOKENS + ["<|im_start|>"]]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def rollout_prompts(model, processor, data, rows: list[int], columns: dict, cfg, generator=None) -> list[dict]:
    """Roll out G completions for each data row; returns one dict per prompt (the rollouts.jsonl rows)."""
    stop_ids, forbidden = stage1.stop_token_ids(processor), forbidden_token_ids(processor)
    records = []
    for start in tqdm(range(0, len(rows), cfg.prompts_per_batch), desc="rollouts", leave=False,
                      disable=len(rows) <= cfg.prompts_per_batch):  # a bar only when there are several batches
        chunk = rows[start: start + cfg.prompts_per_batch]
        images = [stage1.row_image(data, i, columns["image"]) for i in chunk]
        prompt = stage1.to_device(stage1.encode_prompts(processor, images, [data[i][columns["question"]] for i in chunk]),
                                  cfg.device)
        tensors = sample_completions(model, prompt, cfg.group_size, cfg.max_new_tokens, stop_ids, forbidden,
                                     processor.tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        rollouts = to_rollouts(processor, *tensors)
        for k, row in enumerate(chunk):
            group = rollouts[k * cfg.group_size: (k + 1) * cfg.group_size]
            records.append({"row": row, "question": data[row][columns["question"]],
                            "answer": str(data[row][columns["answer"]]),
                            "completions": [dataclasses.asdict(r) for r in group]})
    return records


def data_columns(stage1_config: dict) -> dict:
    return {"image": stage1_config["image_column"], "question": stage1_config["question_column"],
            "answer": stage1_config["answer_column"]}


def main(cfg: Config) -> list[dict]:
    from datasets import load_from_disk

    run_dir = Path(cfg.runs_dir) / cfg.run
    stage1_config = stage1.read_stage1(run_dir)["config"]
    data = load_from_disk(str(stage1.require(run_dir / "data", "python 01_sft_rm.py")))
    if cfg.split not in data:
        raise SystemExit(f"--split {cfg.split}: {run_dir / 'data'} has splits {list(data)}.")
    data = data[cfg.split]
    policy = cfg.policy or str(stage1.require(run_dir / "policy_sft", "python 01_sft_rm.py"))
    model, processor = stage1.load_policy(policy, cfg.device)
    model.eval()

    rows = random.Random(cfg.seed).sample(range(len(data)), min(cfg.n_prompts, len(data)))
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    started = time.time()
    records = rollout_prompts(model, processor, data, rows, data_columns(stage1_config), cfg, generator)
    seconds = time.time() - started
    stage1.write_jsonl_atomic(run_dir / "rollouts.jsonl", records)

    completions = [c for r in records for c in r["completions"]]
    tokens = sum(c["length"] for c in completions)
    print(f"\n{len(records)} prompts x {cfg.group_size} completions, {tokens} tokens in {seconds:.1f} s "
          f"({tokens / seconds:.0f} tokens/s); mean length {tokens / len(completions):.1f}, "
          f"truncated {sum(c['truncated'] for c in completions) / len(completions):.1%}")
    print(f"  e.g. {completions[0]['text']!r}")
    print(f"wrote {run_dir / 'rollouts.jsonl'}")
    return records


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
