"""Stage 2's fast sampler against its simple loop: the same tokens, the same log-probs (CPU, tiny models).

The fast path runs eagerly on the CPU by default; test_compiled_step_compiles_once compiles its step with
torch.compile's "eager" backend (dynamo traces the step, no code generation), which checks the fixed-shape
contract (one graph, no recompiles) in seconds: that test took 2.2 s on the 2-core CPU machine.
"""
import functools

import pytest
import torch
from PIL import Image

from conftest import load_stage
from test_rollout import mixed_batch

stage2 = load_stage("02_rollout.py")
stage1 = load_stage("01_sft_rm.py")


def both_samplers(model, prompt, args: tuple, seed: int, compile_mode=None, **kwargs):
    """(simple, fast) outputs for the same arguments, each with its own generator seeded alike."""
    simple = stage2.sample_completions(model, prompt, *args, generator=torch.Generator().manual_seed(seed),
                                       **kwargs)
    fast = stage2.sample_completions_fast(model, prompt, *args, generator=torch.Generator().manual_seed(seed),
                                          compile_mode=compile_mode, **kwargs)
    return simple, fast


def assert_same(simple, fast):
    ids, mask, logprobs, truncated = simple
    assert torch.equal(fast[0], ids) and torch.equal(fast[1], mask) and torch.equal(fast[3], truncated)
    assert torch.allclose(fast[2], logprobs, rtol=0, atol=1e-5)


def some_rows_stop_id(model, prompt, args: tuple, seed: int, **kwargs) -> int:
    """A token that some but not all rows sample: as the only stop id it ends those rows early and leaves the
    others truncated (the draws are the same with or without stop ids: every step samples all rows).
    args: sample_completions' (G, L, stop_ids, forbidden_ids, pad_id), whose stop_ids are ignored."""
    G, L, _, forbidden, pad = args
    generator = torch.Generator().manual_seed(seed)
    ids = stage2.sample_completions(model, prompt, G, L, [], forbidden, pad, generator=generator, **kwargs)[0]
    rows_with = {token: int((ids == token).any(1).sum()) for token in ids.unique().tolist()}
    return next(token for token, n in sorted(rows_with.items(), key=lambda kv: kv[1]) if 0 < n < ids.shape[0] // 2)


def test_greedy_same_tokens(policy):
    model, processor = policy
    prompt = mixed_batch(processor)  # 3 image sizes, 3 prompt lengths
    args = (2, 24, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    simple, fast = both_samplers(model, prompt, args, 0, temperature=0.0)
    assert_same(simple, fast)


def test_sampling_same_draws_with_early_stops_and_truncation(policy):
    model, processor = policy
    prompt = mixed_batch(processor)
    G, L, pad = 3, 16, processor.tokenizer.pad_token_id
    args = (G, L, [], stage2.forbidden_token_ids(processor), pad)
    args = (G, L, [some_rows_stop_id(model, prompt, args, 5, top_p=0.95)], *args[3:])
    simple, fast = both_samplers(model, prompt, args, 5, top_p=0.95)
    assert_same(simple, fast)
    truncated, lengths = simple[3], simple[1].sum(1)
    assert truncated.any() and (~truncated).any()  # rows that stop early and rows cut by the budget, together
    assert (lengths[~truncated] < L).all() and (lengths[truncated] == L).all()
    assert simple[0].shape == (9, L)  # G = 3 rows for each of the 3 prompts


def test_budget_truncates_every_row(policy):
    model, processor = policy
    prompt = mixed_batch(processor)
    args = (2, 3, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    simple, fast = both_samplers(model, prompt, args, 1, temperature=0.7, top_k=5)
    assert_same(simple, fast)
    assert fast[1].shape == (6, 3) and fast[3].all()


def test_all_rows_stopped_ends_the_loop_early(tiny_policy):
    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    args = (2, 200, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    simple, fast = both_samplers(model, prompt, args, 0, temperature=0.0)
    assert_same(simple, fast)
    assert not fast[3].any() and fast[1].shape[1] < 200  # the fine-tuned policy stops: columns end at the longest


def test_eager_attention_mask(tiny_run):
    """Eager attention adds the mask to the scores: the fast path turns its boolean mask into 0 / -inf."""
    from transformers import AutoModelForImageTextToText

    path = tiny_run["dir"] / "policy_sft"
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    processor = stage1.load_policy(str(path), "cpu")[1]
    prompt = mixed_batch(processor)
    args = (2, 16, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    simple, fast = both_samplers(model, prompt, args, 2, temperature=1.0)
    assert_same(simple, fast)


def test_compiled_step_compiles_once(tiny_policy, monkeypatch):
    """torch.compile'd step (dynamo, eager backend): same samples, one graph for every step of two calls."""
    from torch._dynamo.utils import counters

    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    args = (2, 20, stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor),
            processor.tokenizer.pad_token_id)
    for seed in (3, 4):  # the second call reuses the first one's decoder and graph
        simple, fast = both_samplers(model, prompt, args, seed, temperature=1.0, compile_mode="default")
        assert_same(simple, fast)
        assert fast[1].sum() > 3 * 2 * 3  # the compiled step ran: rows got past their first few tokens
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["recompiles"].values()) == 0
    decoder = next(d for k, d in stage2.DECODERS.items() if k[0] == id(model) and k[-1] == "default")
    assert decoder.compile_mode == "default"  # compiled, no fallback
    stage2.DECODERS.clear()
    torch._dynamo.reset()


def test_capture_failure_falls_back_loudly(tiny_policy, monkeypatch, capsys):
    """A step that fails to compile or capture under reduce-overhead falls back to "default", with a warning."""
    model, processor = tiny_policy
    prompt = mixed_batch(processor)

    def compile_that_fails_to_capture(fn, mode=None, **kwargs):
        if mode == "reduce-overhead":
            def broken(*args):
                raise RuntimeError("CUDA graph capture failed (simulated)")
            return broken
        return fn  # "default": the step runs as it is

    monkeypatch.setattr(torch, "compile", compile_that_fails_to_capture)
    stage2.DECODERS.clear()
    args = (2, 12, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    assert_same(*both_samplers(model, prompt, args, 0, compile_mode="reduce-overhead", temperature=1.0))
    assert [d.compile_mode for d in stage2.DECODERS.values()] == ["default"]
    out = capsys.readouterr().out
    assert "WARNING" in out and "simulated" in out and "falling back to 'default'" in out
    stage2.DECODERS.clear()


def test_prompts_of_a_new_length_share_the_decoder(tiny_policy):
    """W = prompt + budget rounded up to 64: batches whose prompts differ by a few tokens use one decoder."""
    model, processor = tiny_policy
    images = [Image.new("RGB", (56, 56), "white"), Image.effect_noise((84, 84), 60).convert("RGB")]
    short = stage1.encode_prompts(processor, images, ["How many?"] * 2)  # P = 54
    long = stage1.encode_prompts(processor, images, ["How many red shapes?"] * 2)  # P = 56
    assert short["input_ids"].shape[1] < long["input_ids"].shape[1] <= 64 - 8  # W = 64 for both with L = 8
    stage2.DECODERS.clear()
    args = (2, 8, stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    for prompt in (short, long):
        assert_same(*both_samplers(model, prompt, args, 0, temperature=1.0))
    assert len(stage2.DECODERS) == 1


def test_dispatcher_and_config_flag(tiny_run, tiny_policy, test_split):
    assert stage2.sampler("auto", "cpu") is stage2.sample_completions
    assert stage2.sampler("auto", "cuda") is stage2.sample_completions_fast
    assert stage2.sampler("on", "cpu") is stage2.sample_completions_fast
    assert stage2.sampler(False, "cuda") is stage2.sample_completions
    with pytest.raises(ValueError):
        stage2.use_fast("yes", "cpu")
    model, processor = tiny_policy
    columns = stage2.data_columns(stage1.read_stage1(tiny_run["dir"])["config"])
    records = {}
    for fast in ("off", "on"):  # rollout_prompts (what stages 2 and 6 call): the same records either way
        cfg = stage2.Config(group_size=3, prompts_per_batch=2, max_new_tokens=24, fast=fast, device="cpu")
        records[fast] = stage2.rollout_prompts(model, processor, test_split, [0, 1, 2, 3], columns, cfg,
                                               torch.Generator().manual_seed(0))
    for off, on in zip(records["off"], records["on"], strict=True):
        for a, b in zip(off["completions"], on["completions"], strict=True):
            assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"] and a["truncated"] == b["truncated"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 1e-5


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_step_compiles_under_stage5_checkpointing(tiny_run, monkeypatch, lora_rank):
    """Stage 5 with --gradient-checkpointing (and LoRA) samples from the model it trains. transformers' checkpointing
    hooks the input embeddings with a requires_grad_() call that the GPU image's torch 2.11 dynamo cannot trace: on
    an H200 the fast step fell back to eager (58 s per 3B LoRA rollout). torch 2.14's dynamo (CPU) traces it, so
    the hook itself is checked: enable_checkpointing removes it, and the step compiles with no fallback."""
    stage5 = load_stage("05_grpo_train.py")
    model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    if lora_rank:
        model = stage5.add_lora(stage5.Config(lora_rank=lora_rank, lora_alpha=8.0), model)
    stage5.enable_checkpointing(model)
    assert not stage1.unwrap(model).get_input_embeddings()._forward_hooks  # the requires_grad_() hook is gone
    assert stage1.unwrap(model).is_gradient_checkpointing  # and checkpointing is on
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    args = (2, 6, stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor),
            processor.tokenizer.pad_token_id)
    simple, fast = both_samplers(stage1.unwrap(model).eval(), mixed_batch(processor), args, 0, compile_mode="default")
    assert_same(simple, fast)
    decoder = next(d for k, d in stage2.DECODERS.items() if k[-1] == "default")
    assert decoder.compile_mode == "default"  # compiled, no fallback to eager
    stage2.DECODERS.clear()
    torch._dynamo.reset()


def test_grouped_decode_attention_equals_repeated_heads():
    """One query token per row: the grouped attention (g query heads per key/value head, the cache read as it is)
    equals repeating the key/value heads to every query head, masked slots and all."""
    N, H_kv, g, W, D = 3, 2, 3, 10, 8
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(N, H_kv * g, 1, D, generator=generator)  # (N, H, 1, D)
    key, value = (torch.randn(N, H_kv, W, D, generator=generator) for _ in range(2))  # (N, H_kv, W, D)
    mask = torch.rand(N, 1, 1, W, generator=generator) < 0.7  # (N, 1, 1, W)
    mask[:, :, :, 0] = True  # every row attends to something
    module = torch.nn.Module()
    module.num_key_value_groups = g
    grouped, _ = stage2.grouped_decode_attention(module, query, key, value, mask, scaling=0.5)
    repeat = functools.partial(torch.repeat_interleave, repeats=g, dim=1)  # kv head h // g serves query head h
    reference = torch.nn.functional.scaled_dot_product_attention(query, repeat(key), repeat(value), attn_mask=mask,
                                                                 scale=0.5)  # (N, H, 1, D)
    assert grouped.shape == (N, 1, H_kv * g, D)
    assert torch.allclose(grouped, reference.transpose(1, 2), rtol=0, atol=1e-6)


def test_compiled_step_reads_the_cache_without_repeating_heads(policy, monkeypatch):
    """Under torch.compile transformers' sdpa copies the key/value heads out to every query head (repeat_kv); the
    fast step's grouped attention does not: no (N, H, W, D) tensor in its graph. Both architectures, same samples."""
    model, processor = policy
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    recorded = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": recorded_backend}))

    def recorded_backend(gm, example_inputs):
        recorded.append(gm)
        return gm.forward

    counts, prompt = {}, mixed_batch(processor)  # one batch: effect_noise draws new images at each call
    for grouped in (False, True):
        monkeypatch.setattr(stage2, "GROUPED_DECODE", grouped)
        recorded.clear()
        stage2.DECODERS.clear()
        torch._dynamo.reset()
        # forbidden: the vision tokens (sampled, they make the next forward another computation)
        args = (2, 6, [], stage2.forbidden_token_ids(processor), processor.tokenizer.pad_token_id)
        fast = stage2.sample_completions_fast(model, prompt, *args, compile_mode="default",
                                              generator=torch.Generator().manual_seed(7))
        simple = stage2.sample_completions(model, prompt, *args, generator=torch.Generator().manual_seed(7))
        assert_same(simple, fast)
        decoder = next(iter(stage2.DECODERS.values()))
        assert decoder.compile_mode == "default" and len(recorded) == 1  # one graph, compiled
        N, H_kv, W, D = decoder.cache.keys[0].shape
        H = model.config.text_config.num_attention_heads
        shapes = [tuple(node.meta["example_value"].shape) for node in recorded[0].graph.nodes
                  if isinstance(node.meta.get("example_value"), torch.Tensor)]
        counts[grouped] = shapes.count((N, H, W, D)), shapes.count((N, H_kv, W, D))
    layers = model.config.text_config.num_hidden_layers
    # transformers' sdpa under compile: at least the keys and the values of every layer repeated to H heads
    assert counts[False][0] >= 2 * layers
    assert counts[True][0] == 0 and counts[True][1] >= 2 * layers  # grouped: only the cache itself
    assert model.config.text_config._attn_implementation == "sdpa"  # the step's attention was put back
    stage2.DECODERS.clear()
    torch._dynamo.reset()
