"""The update runs each prompt once (05_grpo_train.shared_prompt_logprobs) instead of once per row of its group:
the same log-probs and the same gradients as stage1.completion_logprobs on repeated prompts, on Qwen2-VL and
Qwen2.5-VL, with three image sizes and prompt lengths, rows that stop early, and micro-batches cut mid-group."""
import functools

import pytest
import torch

from conftest import load_stage
from test_rollout import mixed_batch

stage1, stage2, stage5 = load_stage("01_sft_rm.py"), load_stage("02_rollout.py"), load_stage("05_grpo_train.py")
G = 3


def sampled(model, processor, seed=0):
    """3 prompts x G = 3 sampled completions of up to 12 tokens (some stop early: their masks end in zeros)."""
    prompt = mixed_batch(processor)
    ids, mask, _, _ = stage2.sample_completions(model, prompt, G, 12, stage1.stop_token_ids(processor),
                                                stage2.forbidden_token_ids(processor), processor.tokenizer.pad_token_id,
                                                generator=torch.Generator().manual_seed(seed))
    return prompt, ids, mask


def value_and_grads(model, forward):
    """forward() -> (N, L) log-probs; returns them and every parameter's gradient of a masked sum of them."""
    model.zero_grad(set_to_none=True)
    logprobs, mask = forward()
    (logprobs * mask * torch.linspace(-1, 1, mask.shape[0]).unsqueeze(1)).sum().backward()  # advantages -1 .. 1
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logprobs.detach(), grads


@pytest.mark.parametrize("rows", [list(range(3 * G)), [1, 2, 3, 4]])  # the whole batch; a micro-batch cut mid-group
@pytest.mark.parametrize("frozen_tower", [False, True])
def test_shared_prompt_equals_one_prompt_per_row(policy, rows, frozen_tower):
    model, processor = policy
    prompt, ids, mask = sampled(model, processor)
    assert 0 < mask[rows].sum() < mask[rows].numel()  # some rows stopped early, so padding is exercised
    prompt_of = [r // G for r in rows]
    prompts = sorted(set(prompt_of))
    visual = None
    if frozen_tower:
        with torch.no_grad():
            visual = stage1.image_features(model, prompt)  # 3 tensors, one per prompt

    def per_row():
        features = [visual[k] for k in prompt_of] if visual is not None else None
        return stage1.completion_logprobs(model, stage5.prompt_rows(prompt, prompt_of), ids[rows], mask[rows],
                                          1.0, 5, features), mask[rows]

    def shared():
        features = [visual[k] for k in prompts] if visual is not None else None
        return stage5.shared_prompt_logprobs(model, stage5.prompt_rows(prompt, prompts), ids[rows], mask[rows],
                                             [prompts.index(k) for k in prompt_of], 1.0, 5, features), mask[rows]

    model.train()
    try:
        (a, grads_a), (b, grads_b) = value_and_grads(model, per_row), value_and_grads(model, shared)
    finally:
        model.eval()
    real = mask[rows].bool()
    assert torch.allclose(a[real], b[real], rtol=0, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    if not frozen_tower:  # the vision tower's weights get their gradient through the one prompt forward
        assert any("visual" in name for name in grads_b)
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp_min(1e-6)
        assert torch.allclose(grads_a[name], grads_b[name], rtol=0, atol=1e-5 * float(scale)), name


def test_update_with_and_without_prompt_sharing_gives_the_same_weights(tiny_run, monkeypatch):
    """One whole update (micro-batches of 4 rows: groups cut in two) from the same samples, both ways. Plain SGD:
    AdamW's first step is lr * sign(gradient), which turns a 1e-12 difference in a ~0 gradient into 2 * lr."""
    results = []
    model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    prompt, ids, mask = sampled(model, processor, seed=1)  # once: mixed_batch's noise images differ per call
    for share in (True, False):
        model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
        with torch.no_grad():
            old = stage1.completion_logprobs(model, stage5.prompt_rows(prompt, [r // G for r in range(3 * G)]),
                                             ids, mask)
        monkeypatch.setattr(stage5, "SHARE_PROMPTS", share)
        cfg = stage5.Config(group_size=G, micro_batch_size=4, device="cpu", lr=1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)  # weights move by the (clipped) gradient
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        stats = stage5.update(cfg, model, None, optimizer, scheduler, prompt, ids, mask, old,
                              torch.linspace(-1, 1, 3 * G))
        results.append((stats, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (stats_on, weights_on), (stats_off, weights_off) = results
    assert abs(stats_on["loss"] - stats_off["loss"]) < 1e-6
    moved = max((weights_on[n] - weights_off[n]).abs().max().item() for n in weights_on)
    assert moved < 1e-6  # gradients clipped to norm 1: weights moved by up to ~0.1, the same to 1e-6


def test_gradient_checkpointing_falls_back_to_one_prompt_per_row(tiny_run, monkeypatch):
    """transformers drops the KV cache under checkpointing in training, so the shared path is not taken there."""
    model, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    stage5.enable_checkpointing(model)
    prompt, ids, mask = sampled(model, processor)
    calls = []
    monkeypatch.setattr(stage5, "shared_prompt_logprobs", functools.partial(
        lambda original, *a, **k: calls.append(1) or original(*a, **k), stage5.shared_prompt_logprobs))
    cfg = stage5.Config(group_size=G, device="cpu")
    model.train()
    stage5.batch_logprobs(cfg, model, prompt, ids, mask, list(range(3 * G)), None).sum().backward()
    assert calls == []  # with gradients and checkpointing: one prompt per row
    with torch.no_grad():
        stage5.batch_logprobs(cfg, model, prompt, ids, mask, list(range(3 * G)), None)
    assert calls == [1]  # without gradients the cache is kept, so the prompt is shared
