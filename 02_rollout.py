"""Stage 2: rollouts. G sampled completions per prompt, from a sampler written by hand.

Reading guide: the file reads top to bottom as the lesson. Config (every knob, one line each), then
  1. one step's choice   filter_top_k_top_p, next_tokens: the next token, the log-probs it is recorded under
  2. the sampler         prefill, decode (steps 3-4, shared by both samplers), sample_completions (steps 1-4)
  3. rollouts            rollout_prompts: G completions per prompt, batch by batch -> the rows of the file
  4. main()              the stage in order, with the numbers it prints
Appendix A, the fast path: sample_completions_fast takes the same arguments and draws the same random
numbers, so it returns the same tokens, from the same prefill and decode loop over buffers allocated once, its
one-token step compiled by torch.compile (on CUDA a CUDA graph). `--fast` picks one: auto = fast on CUDA,
simple on the CPU (bench/bench_rollout.py times both). Appendix B: small helpers. Skip both at first reading.

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
Writes: runs/<run>/rollouts.jsonl, one row per prompt with its G completions, replaced only once they are all
        sampled (a bad flag or an empty split stops the stage before, and the old file stays).
Run:    python 02_rollout.py [--n-prompts 16 --group-size 8 --temperature 1.0]
"""
import dataclasses
import importlib
import math
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
    dtype: str = "auto"  # compute precision: auto = bf16 on CUDA, fp32 on CPU (01_sft_rm.compute_dtype)
    fast: str = "auto"  # on = sample_completions_fast, off = the simple loop, auto = on for CUDA only
    # (on a CPU the tiny policy's step costs about the same either way, so the readable loop is the one run)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where the policy runs


def check_config(cfg: Config) -> None:
    """Refuse flags that would crash or sample nothing, before anything is read, loaded or written."""
    counts = {"--n-prompts": cfg.n_prompts, "--group-size": cfg.group_size,
              "--prompts-per-batch": cfg.prompts_per_batch, "--max-new-tokens": cfg.max_new_tokens}
    for flag, value in counts.items():
        if value < 1:
            raise SystemExit(f"{flag} {value}: must be at least 1.")
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise SystemExit(f"--temperature {cfg.temperature}: must be a finite number >= 0 (0 = greedy).")
    if cfg.top_k < 0:
        raise SystemExit(f"--top-k {cfg.top_k}: must be at least 0 (0 = off).")
    if not (0 < cfg.top_p <= 1):
        raise SystemExit(f"--top-p {cfg.top_p}: must be in (0, 1] (1 = off).")
    stage1.compute_dtype(cfg.device, cfg.dtype)  # an unknown --dtype is refused there
    stage1.check_device(cfg.device)
    try:  # --fast: use_fast holds its one check (and reads the device, checked above)
        use_fast(cfg.fast, cfg.device)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if cfg.policy:  # a folder that is not there, or not a vision-language model, fails here
        stage1.check_policy("--policy", cfg.policy)


@dataclass
class Rollout:
    """One sampled completion of one prompt."""
    token_ids: list[int]  # the completion, stop token included, no padding
    logprobs: list[float]  # log p(token) under softmax(logits / T), one per token
    length: int  # number of tokens
    truncated: bool  # no stop token within max_new_tokens
    text: str  # decoded, special tokens skipped


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (N, V)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (N, V)
        # mass before it already >= p
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, forbidden_ids: list[int], temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's choice, in fp32 whatever the model's dtype: the next token of each row (N,) and the
    log-probs it is recorded under, log softmax(logits / T) (N, V). logits: (N, V). temperature 0 = greedy."""
    logits = logits.float()  # (N, V)
    recorded = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)  # (N, V)
    allowed = logits.clone()
    allowed[:, forbidden_ids] = float("-inf")
    if temperature > 0:
        allowed = filter_top_k_top_p(allowed / temperature, top_k, top_p)
        token = torch.multinomial(torch.softmax(allowed, dim=-1), 1, generator=generator).squeeze(-1)  # (N,)
    else:
        token = allowed.argmax(dim=-1)  # (N,)
    return token, recorded


def prefill(model, prompt: dict):
    """Step 1: one forward over the B left-padded prompts (image + text) with explicit mRoPE positions.
    Returns the positions (3, B, P), the last logits (B, V) and the KV cache of the prompts."""
    positions, _ = model.model.get_rope_index(
        prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"], attention_mask=prompt["attention_mask"])  # (3, B, P)
    out = model(**prompt, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.cache if "cache" in out else out.past_key_values  # the output's name follows cache_kwarg
    return positions, out.logits[:, -1], cache


def decode(step, logits: torch.Tensor, max_new_tokens: int, stop_ids: list[int], forbidden_ids: list[int],
           pad_id: int, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
    """Steps 3 and 4 for N rows, the same in both samplers: choose each row's next token from logits (N, V),
    record it, and feed it with step(token (N,), t) -> the next logits (N, V), until every row has stopped
    or the budget is spent. Returns ids (N, L), mask (N, L), logprobs (N, L) and truncated (N,)."""
    N, device = logits.shape[0], logits.device
    ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, L)
    mask = torch.zeros((N, max_new_tokens), dtype=torch.long, device=device)  # (N, L)
    logprobs = torch.zeros((N, max_new_tokens), device=device)  # (N, L)
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    stop = torch.tensor(stop_ids, device=device)
    for t in range(max_new_tokens):  # 3. decode
        # token (N,), recorded (N, V)
        token, recorded = next_tokens(logits, forbidden_ids, temperature, top_k, top_p, generator)
        token = torch.where(finished, pad_id, token)  # finished rows only pad
        ids[:, t], mask[:, t] = token, (~finished).long()
        logprobs[:, t] = recorded.gather(-1, token.unsqueeze(-1)).squeeze(-1) * (~finished)
        finished = finished | torch.isin(token, stop)  # 4. the stop token itself stays in the completion
        if t + 1 == max_new_tokens or (t + 1) % 4 == 0 and bool(finished.all()):  # a host sync every 4 steps
            break
        logits = step(token, t)  # (N, V)
    length = int(mask.sum(dim=1).max())  # drop columns that only hold padding
    return ids[:, :length], mask[:, :length], logprobs[:, :length], ~finished


@torch.no_grad()
def sample_completions(model, prompt: dict, group_size: int, max_new_tokens: int, stop_ids: list[int],
                       forbidden_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, generator: torch.Generator | None = None):
    """Sample group_size completions for each of the B prompts; rows k*G ... k*G+G-1 belong to prompt k.

    prompt: encode_prompts output on the model's device (left padded).
    Returns ids (N, L), mask (N, L), logprobs (N, L) and truncated (N,), with N = B * G.
    """
    G = group_size
    positions, logits, cache = prefill(model, prompt)  # 1. prefill
    cache.batch_repeat_interleave(G)  # 2. (B, ...) -> (B * G, ...): each prompt's cache copied G times
    prompt_mask = prompt["attention_mask"].repeat_interleave(G, dim=0)  # (N, P)
    # (3, N, 1): left padding -> the last position is real
    first_position = positions[:, :, -1:].repeat_interleave(G, dim=1) + 1
    cache_name = cache_kwarg(model)

    def step(token: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token (N,) at position last + 1 + t; it attends to the prompt and every token fed so far."""
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(token), t + 1)], dim=1)  # (N, P + t + 1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=mask,
                    position_ids=first_position + t, use_cache=True, **{cache_name: cache})
        return out.logits[:, -1]

    return decode(step, logits.repeat_interleave(G, dim=0), max_new_tokens, stop_ids, forbidden_ids, pad_id,
                  temperature, top_k, top_p, generator)


def rollout_prompts(model, processor, data, rows: list[int], columns: dict, cfg,
                    generator=None) -> list[dict]:
    """Roll out G completions for each data row; returns one dict per prompt (the rollouts.jsonl rows)."""
    stop_ids, forbidden = stage1.stop_token_ids(processor), forbidden_token_ids(processor)
    sample = sampler(getattr(cfg, "fast", "auto"), cfg.device)  # a config without the field: the default
    records = []
    # a bar only when there are several batches
    for start in tqdm(range(0, len(rows), cfg.prompts_per_batch), desc="rollouts", leave=False,
                      disable=len(rows) <= cfg.prompts_per_batch):
        chunk = rows[start: start + cfg.prompts_per_batch]
        images = [stage1.row_image(data, i, columns["image"]) for i in chunk]
        questions = [data[i][columns["question"]] for i in chunk]
        prompt = stage1.to_device(stage1.encode_prompts(processor, images, questions), cfg.device)
        tensors = sample(model, prompt, cfg.group_size, cfg.max_new_tokens, stop_ids, forbidden,
                         processor.tokenizer.pad_token_id, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        rollouts = to_rollouts(processor, *tensors)
        for k, row in enumerate(chunk):
            group = rollouts[k * cfg.group_size: (k + 1) * cfg.group_size]
            records.append({"row": row, "question": data[row][columns["question"]],
                            "answer": str(data[row][columns["answer"]]),
                            "completions": [dataclasses.asdict(r) for r in group]})
    return records


def main(cfg: Config) -> list[dict]:
    from datasets import load_from_disk

    check_config(cfg)  # every flag, before anything is read, loaded or written
    run_dir = Path(cfg.runs_dir) / cfg.run
    stage1_config = stage1.read_stage1(run_dir)["config"]
    data = load_from_disk(str(stage1.require(run_dir / "data", "python 01_sft_rm.py")))
    if cfg.split not in data:
        raise SystemExit(f"--split {cfg.split}: {run_dir / 'data'} has splits {list(data)}.")
    data = data[cfg.split]
    if len(data) == 0:
        raise SystemExit(f"--split {cfg.split}: {run_dir / 'data'} has no rows in it; pick another split "
                         f"({run_dir / 'rollouts.jsonl'} is left as it was).")
    policy = cfg.policy or str(stage1.require(run_dir / "policy_sft", "python 01_sft_rm.py"))
    # nothing trains here: the policy is stored in the compute dtype (bf16 on CUDA), as in stages 5 and 6
    model, processor = stage1.load_policy(policy, cfg.device,
                                          dtype=stage1.compute_dtype(cfg.device, cfg.dtype))
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


# ============================================================================================================
# Appendix A: the fast path (skip on a first reading)
# The lesson's loop (sample_completions) launches a few hundred small kernels per token from Python and grows
# its cache by concatenation: on a GPU the step waits on those launches, not on memory (`python
# bench/bench_rollout.py --profile` shows it). The fast path keeps steps 1-4 and changes only how a step runs:
# every tensor the decode step touches is allocated once, with a fixed shape and a fixed address, so
# torch.compile compiles the step once and, on CUDA, records it as one CUDA graph that replays in a single
# launch. Its attention reads the grouped key/value heads as they are (grouped_decode_attention).
# ============================================================================================================


class SlotCache:
    """A KV cache preallocated as N rows x W slots per layer; `update` writes the slot `self.slot` holds.

    It stands in for transformers' Cache in the decode forward, where attention calls only
    update(key, value, layer_idx) (with the mask prepared and the positions given, nothing else is asked).
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, width: int, head_dim: int, key_dtype,
                 value_dtype, device):
        self.keys = [torch.zeros(rows, kv_heads, width, head_dim, dtype=key_dtype, device=device)
                     for _ in range(layers)]  # per layer (N, H_kv, W, D)
        self.values = [torch.zeros(rows, kv_heads, width, head_dim, dtype=value_dtype, device=device)
                       for _ in range(layers)]  # per layer (N, H_kv, W, D)
        # (1,): where this step's key and value go
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key, value: (N, H_kv, 1, D), written in place -> the layer's whole (N, H_kv, W, D) keys and
        values."""
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]


def grouped_decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """Attention for one new token per row over a grouped-query cache, reading each key/value head once.

    query (N, H, 1, D); key, value (N, H_kv, W, D) with H = H_kv * g; attention_mask (N, 1, 1, W), True =
    attend -> (N, 1, H, D), transformers' attention output layout. The g query heads that share a key/value
    head become g query rows of that head: one attention over (N, H_kv, g, D) queries, the cache as it is.
    transformers' sdpa does the same when it runs eagerly ("pack_gqa"), but under torch.compile it copies
    the cache out to all H heads first (repeat_kv), a large share of the step's memory traffic on a GPU
    (docs/LOG.md, rollout speed). Anything but a one-token query (the prefill) goes to transformers' sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    N, H, Q, D = query.shape
    if Q != 1 or key.shape[1] == H:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    grouped = query.reshape(N, key.shape[1], H // key.shape[1], D)  # (N, H_kv, g, D)
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)  # (N, H_kv, g, D)
    return out.reshape(N, 1, H, D), None  # head h = kv head h // g, member h % g: the order repeat_kv makes


GROUPED_ATTENTION = "cora_grouped_decode"  # its name in transformers' AttentionInterface
# sdpa models decode with grouped_decode_attention; False keeps transformers' sdpa, which under torch.compile
# repeats the key/value heads (bench/bench_rollout.py's fast-repeat column and a test set it to compare both)
GROUPED_DECODE = True


class StaticDecoder:
    """The fast path's decode state for N rows and W slots, and the one-token step compiled over it.

    Slots of a row: [0, P) its prompt (left padding masked out), P + t the token fed at step t, the rest
    masked until used. The step's inputs (token, mRoPE position, mask, cache) are preallocated buffers
    updated in place, so it compiles once per (N, W) and is reused by every later call of that shape (see
    decoder_for).
    """

    def __init__(self, model, prefill_cache, rows: int, width: int, compile_mode: str | None):
        attention = model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"the fast sampler builds its own attention mask for sdpa or eager attention, "
                             f"not {attention!r}: load the model with attn_implementation='sdpa', "
                             f"or use --fast off")
        # the language model's config, which its attention layers read to pick their attention function
        self.text_config = model.model.language_model.config
        self.step_attention = attention  # sdpa models decode with grouped_decode_attention (GROUPED_DECODE)
        if attention == "sdpa" and GROUPED_DECODE:
            from transformers import AttentionInterface

            AttentionInterface.register(GROUPED_ATTENTION, grouped_decode_attention)
            self.step_attention = GROUPED_ATTENTION
        first = prefill_cache.layers[0]
        _, kv_heads, _, head_dim = first.keys.shape
        device = first.keys.device
        self.cache = SlotCache(len(prefill_cache.layers), rows, kv_heads, width, head_dim, first.keys.dtype,
                               first.values.dtype, device)  # dtypes as the prefill's (autocast may mix them)
        # the step's inputs: mask (N, 1, 1, W), True = attend; token (N, 1), the token fed;
        # position (3, N, 1), its mRoPE position
        self.mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool, device=device)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(3, rows, 1, dtype=torch.long, device=device)
        if compile_mode is not None:
            buffers = [self.mask, self.token, self.position, self.cache.slot,
                       *self.cache.keys, *self.cache.values]
            for buffer in buffers:
                torch._dynamo.mark_static_address(buffer)  # a CUDA graph reads these addresses, never copies
        self.model, self.cache_name, self.additive = model, cache_kwarg(model), attention == "eager"
        self.prompt_length = 0
        started = time.perf_counter()
        self.compile_mode = self.compile(compile_mode)
        # compile + CUDA-graph capture, paid once per shape
        self.setup_seconds = time.perf_counter() - started

    def forward(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """token (N, 1), position (3, N, 1), mask (N, 1, 1, W) -> next logits (N, V); writes one cache
        slot."""
        if self.additive:  # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min)
        out = self.model(input_ids=token, attention_mask={"full_attention": mask}, position_ids=position,
                         use_cache=True, **{self.cache_name: self.cache})  # a dict mask is used as given
        return out.logits[:, -1]

    def compile(self, mode: str | None) -> str | None:
        """Compile the step and run it until captured. Should that fail, fall back, loudly:
        reduce-overhead (CUDA graphs) -> default (compiled, no graphs) -> eager. Returns the mode in use."""
        self.compiled = None
        if mode is None:
            return None
        from torch._dynamo.utils import counters

        fallbacks = [mode] + (["default"] if mode == "reduce-overhead" else []) + [None]
        for candidate in fallbacks:
            # fixed shapes, one graph, no breaks
            self.compiled = None if candidate is None else torch.compile(
                self.forward, mode=candidate, dynamic=False, fullgraph=True)
            skipped = counters["inductor"]["cudagraph_skips"]
            try:
                self.mask[:, 0, 0, 0] = True  # a dummy row to attend to; start() overwrites all of it
                for _ in range(3):  # CUDA graph trees: a warm-up run, a recording, a replay
                    self.run()
            except Exception as error:  # any failure to compile or capture: fall back
                if candidate is None:
                    raise
                print(f"\n{'!' * 100}\nWARNING: the fast sampler's decode step failed under torch.compile "
                      f"mode={candidate!r}:\n  {type(error).__name__}: {str(error)[:500]}\n"
                      f"falling back to {fallbacks[fallbacks.index(candidate) + 1]!r}\n{'!' * 100}\n",
                      flush=True)
                continue
            if counters["inductor"]["cudagraph_skips"] > skipped:
                print(f"\n{'!' * 100}\nWARNING: CUDA graphs were skipped for the fast sampler's step "
                      f"(run with TORCH_LOGS=perf_hints to see why): it runs compiled, launch by launch\n"
                      f"{'!' * 100}\n", flush=True)
            return candidate

    def run(self) -> torch.Tensor:
        """One step. For its duration the language model's attention is self.step_attention (the prefill and
        the update keep the model's own): the compiled step is traced, and guarded, with it set."""
        prefill_attention = self.text_config._attn_implementation
        self.text_config._attn_implementation = self.step_attention
        try:
            if self.compiled is None:
                return self.forward(self.token, self.position, self.mask)
            # the last step's logits are consumed: a graph may reuse them
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(self.token, self.position, self.mask)
        finally:
            self.text_config._attn_implementation = prefill_attention

    def start(self, prefill_cache, prompt_mask: torch.Tensor, next_position: torch.Tensor, group_size: int):
        """Copy B prefilled prompts into the N = B * G rows (row b * G + g gets prompt b) at slots [0, P).
        prompt_mask: (B, P); next_position: (3, B, 1), the first decode position of each prompt."""
        B, P = prompt_mask.shape
        for keys, values, layer in zip(self.cache.keys, self.cache.values, prefill_cache.layers):
            rows_by_prompt = (B, group_size) + keys.shape[1:]  # (B, G, H_kv, W, D): a view, nothing copied
            keys.view(rows_by_prompt)[:, :, :, :P].copy_(layer.keys.unsqueeze(1))
            values.view(rows_by_prompt)[:, :, :, :P].copy_(layer.values.unsqueeze(1))
        self.mask.zero_()
        self.mask[:, 0, 0, :P] = prompt_mask.bool().repeat_interleave(group_size, dim=0)
        self.position.copy_(next_position.repeat_interleave(group_size, dim=1))
        self.prompt_length = P

    def step(self, token: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token (N,) at step t (slot P + t) -> the next logits (N, V)."""
        slot = self.prompt_length + t
        self.mask[:, 0, 0, slot] = True  # the token attends to itself and, from now on, is attended to
        self.cache.slot.fill_(slot)
        self.token.copy_(token.unsqueeze(-1))
        logits = self.run()
        self.position += 1
        return logits


# (model id, rows, width, dtypes, device, grouped attention, mode) -> decoder, for the last model
DECODERS: dict[tuple, StaticDecoder] = {}
MAX_DECODERS = 4  # shapes kept at once: each holds its own KV cache (and, on CUDA, its graph's memory)


def decoder_for(model, prefill_cache, rows: int, width: int, compile_mode: str | None) -> StaticDecoder:
    """The StaticDecoder of this shape, built (and compiled) on first use. Decoders are kept for the last
    model sampled from: a new model drops the old ones, their caches and their compiled steps."""
    layer = prefill_cache.layers[0]
    key = (id(model), rows, width, layer.keys.dtype, layer.values.dtype, str(layer.keys.device),
           GROUPED_DECODE, compile_mode)
    if any(k[0] != id(model) for k in DECODERS):
        compiled = any(d.compile_mode for d in DECODERS.values())
        DECODERS.clear()
        if compiled:
            # forget their compiled steps and CUDA graphs (or torch's recompile limit bites)
            torch._dynamo.reset()
    if key not in DECODERS:
        if len(DECODERS) >= MAX_DECODERS:
            DECODERS.pop(next(iter(DECODERS)))  # the oldest shape
        DECODERS[key] = StaticDecoder(model, prefill_cache, rows, width, compile_mode)
    return DECODERS[key]


def default_compile_mode(device) -> str | None:
    """CUDA: "reduce-overhead", i.e. torch.compile + CUDA graphs, the step replayed in one launch.
    CPU: None, the step runs eagerly: for the embedded policy compiling gains little and costs seconds of
    compiling per process and shape (docs/LOG.md, rollout speed)."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


@torch.no_grad()
def sample_completions_fast(model, prompt: dict, group_size: int, max_new_tokens: int, stop_ids: list[int],
                            forbidden_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                            top_p: float = 1.0, generator: torch.Generator | None = None,
                            compile_mode: str | None = "auto", width_multiple: int = 64):
    """sample_completions with a preallocated cache and a compiled decode step: the same prefill and decode
    loop, StaticDecoder.step as its step. Same arguments and returns, the same random draws from the same
    generator, so the same tokens, and log-probs equal up to float rounding.

    compile_mode: a torch.compile mode, None (eager), or "auto" (default_compile_mode of the model's device).
    width_multiple: cache width W = prompt + budget rounded up to a multiple of it, so that batches whose
    prompts differ by a few tokens share one compiled step.
    """
    positions, logits, prefill_cache = prefill(model, prompt)  # 1. prefill, once per prompt
    N, P = logits.shape[0] * group_size, prompt["input_ids"].shape[1]
    if compile_mode == "auto":
        compile_mode = default_compile_mode(logits.device)
    width = -(-(P + max_new_tokens) // width_multiple) * width_multiple  # W: P + budget, rounded up
    decoder = decoder_for(model, prefill_cache, N, width, compile_mode)
    # 2. expand into the N rows
    decoder.start(prefill_cache, prompt["attention_mask"], positions[:, :, -1:] + 1, group_size)
    del prefill_cache  # the prompt's cache now lives in the decoder's slots
    return decode(decoder.step, logits.repeat_interleave(group_size, dim=0), max_new_tokens, stop_ids,
                  forbidden_ids, pad_id, temperature, top_k, top_p, generator)  # 3. and 4.


# ============================================================================================================
# Appendix B: small helpers (skip on a first reading)
# Which sampler --fast picks, the sampler's tensors as Rollout rows, stage 1's column names, the token ids
# never sampled, transformers' name for the cache argument.
# ============================================================================================================


def use_fast(fast: bool | str, device) -> bool:
    """Config.fast -> bool: True/"on", False/"off", or "auto" (on for CUDA only); anything else is refused."""
    if isinstance(fast, bool):
        return fast
    if fast not in ("auto", "on", "off"):
        raise ValueError(f"--fast {fast}: use auto, on or off.")
    return fast == "on" or (fast == "auto" and torch.device(device).type == "cuda")


def sampler(fast: bool | str, device):
    """The sampler one flag picks: sample_completions_fast or sample_completions (same arguments, same
    returns)."""
    return sample_completions_fast if use_fast(fast, device) else sample_completions


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


def data_columns(stage1_config: dict) -> dict:
    return {"image": stage1_config["image_column"], "question": stage1_config["question_column"],
            "answer": stage1_config["answer_column"]}


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed the cache argument `past_key_values` -> `cache`; accept both."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def forbidden_token_ids(processor) -> list[int]:
    """Vision special tokens (and <|im_start|>) may never be sampled."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in stage1.VISION_TOKENS + ["<|im_start|>"]]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
