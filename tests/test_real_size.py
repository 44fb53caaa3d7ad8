"""Real sizes on one GPU, proven on the CPU: the precision rule, chunked log-probs, the vision tower once
per prompt, LoRA (only adapters train, the reference is the adapters-off model, stage 6 loads the result)."""
import json

import pytest
import torch
from PIL import Image

from conftest import load_stage

stage1, stage5, stage6 = load_stage("01_sft_rm.py"), load_stage("05_grpo_train.py"), load_stage("06_eval.py")


def full_vocabulary_logprobs(model, prompt, ids, mask, temperature=1.0):
    """The definition (completion_logprobs unchunked, as at commit 258b8d4): the whole (B, L, V) fp32 log-softmax at once."""
    L = ids.shape[1]
    out = model(input_ids=torch.cat([prompt["input_ids"], ids], 1),
                attention_mask=torch.cat([prompt["attention_mask"], mask], 1),
                mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1),
                pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"], logits_to_keep=L + 1)
    logprobs = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)  # (B, L, V)
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, L)


def batch_of_three(processor):
    """Three image sizes (4, 9 and 12 visual tokens), three prompt and three completion lengths."""
    images = [Image.new("RGB", (56, 56), "white"), Image.effect_noise((84, 84), 60).convert("RGB"),
              Image.effect_noise((112, 84), 90).convert("RGB")]
    prompt = stage1.encode_prompts(processor, images, ["How many red shapes are there?", "Which bar?", "How many?"])
    ids, mask = stage1.encode_completions(processor, ["<think>I count 1, 2.</think><answer>2</answer>",
                                                      "<think>A 2, B 5.</think><answer>B</answer>", "3"], "cpu")
    return prompt, ids, mask


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def policy(request, tiny_run, tiny_qwen25):
    path = tiny_run["dir"] / "policy_sft" if request.param == "qwen2-vl" else tiny_qwen25
    model, processor = stage1.load_policy(str(path), "cpu")
    return model.eval(), processor


def test_precision_rule():
    assert stage1.compute_dtype("cpu") == torch.float32 and stage1.compute_dtype("cuda:0") == torch.bfloat16
    assert stage1.compute_dtype("cpu", "bf16") == torch.bfloat16 and stage1.compute_dtype("cuda", "fp32") == torch.float32
    # why trained weights stay fp32: bf16 keeps 8 significant bits, so near 0.01 (2^-7 <= 0.01 < 2^-6) its spacing
    # is 2^-7 * 2^-7 = 6.1e-5, and an update of 1e-6 (lr 1e-6 x a unit Adam step) is below half of it: lost.
    weight = torch.tensor(0.01, dtype=torch.bfloat16)
    assert weight + 1e-6 == weight
    assert torch.tensor(0.01) + 1e-6 != torch.tensor(0.01)  # fp32 (spacing 9.3e-10 there) keeps it


def test_chunked_logprobs_equal_the_full_vocabulary_definition(policy):
    model, processor = policy
    prompt, ids, mask = batch_of_three(processor)
    expected = full_vocabulary_logprobs(model, prompt, ids, mask, temperature=0.7)
    for chunk in (1, 5, 256):
        got = stage1.completion_logprobs(model, prompt, ids, mask, temperature=0.7, chunk_size=chunk)
        assert torch.allclose(got * mask, expected * mask, atol=1e-5)
    # and the same gradient: checkpointed chunks recompute their logits in backward
    grads = []
    for fn in (full_vocabulary_logprobs, lambda *a: stage1.completion_logprobs(*a, chunk_size=4)):
        model.zero_grad()
        (fn(model, prompt, ids, mask) * mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_visual_features_once_per_prompt_give_the_same_logprobs(policy):
    model, processor = policy
    prompt, ids, mask = batch_of_three(processor)
    expected = stage1.completion_logprobs(model, prompt, ids, mask)
    with torch.no_grad():
        visual = stage1.image_features(model, prompt)
    assert [v.shape[0] for v in visual] == [1, 2, 3] or len(visual) == 3  # one entry per prompt's image
    got = stage1.completion_logprobs(model, prompt, ids, mask, visual=visual)
    assert torch.allclose(got * mask, expected * mask, atol=1e-5)
    # a GRPO batch: rows 0..5 are prompts 0, 0, 1, 1, 2, 2 (G = 2); features of 3 prompts serve 6 rows
    cfg = stage5.Config(group_size=2, device="cpu")
    rows, ids2, mask2 = list(range(6)), ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    once = stage5.batch_logprobs(cfg, model, prompt, ids2, mask2, rows, visual)
    per_row = stage5.batch_logprobs(cfg, model, prompt, ids2, mask2, rows, None)
    assert torch.allclose(once * mask2, per_row * mask2, atol=1e-5)


def lora_config(tiny_run, **overrides):
    base = dict(run="tiny", runs_dir=str(tiny_run["dir"].parent), name="lora", steps=2, prompts_per_step=2,
                group_size=3, max_new_tokens=24, checkpoint_every=1, save_rollouts_every=100, lr=5e-3, kl_beta=0.1,
                lora_rank=4, lora_alpha=8.0, device="cpu")
    return stage5.Config(**{**base, **overrides})


def test_lora_trains_only_adapters_and_its_reference_is_the_initial_policy(tiny_run):
    cfg = lora_config(tiny_run)
    init, processor = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")
    model = stage5.add_lora(cfg, stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")[0])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # the vision tower is frozen under LoRA
    assert stage5.vision_is_frozen(model)
    prompt, ids, mask = batch_of_three(processor)
    # the reference (adapters off) equals the initial policy, before and after the adapters moved
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # adapters away from their zero start
    ref = stage5.reference_logprobs(stage5.Config(group_size=1, device="cpu"), model, None, prompt, ids, mask,
                                    [0, 1, 2], None)
    assert torch.allclose(ref * mask, stage1.completion_logprobs(init, prompt, ids, mask) * mask, atol=1e-5)
    moved = stage1.completion_logprobs(model, prompt, ids, mask)
    assert not torch.allclose(moved * mask, ref * mask, atol=1e-3)  # while the adapted policy differs

    # two training steps: only adapter weights change; the saved policy is base + adapter and loads in stage 6
    stage5.main(cfg)
    out = tiny_run["dir"] / "lora" / "policy"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["base_model_name_or_path"] == str(tiny_run["dir"] / "policy_sft")
    trained, _ = stage1.load_policy(str(out), "cpu")
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                for n, p in trained.named_parameters() if "lora_" not in n}
    before = dict(init.named_parameters())
    assert set(base_now) == set(before) and all(torch.equal(base_now[n], before[n]) for n in before)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # B starts at zero: non-zero means it trained
    rows = stage1.read_jsonl(tiny_run["dir"] / "lora" / "metrics.jsonl")
    assert len(rows) == 2 and rows[1]["kl"] > 0  # the KL to the adapters-off reference is measured
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(tiny_run["dir"].parent), n=2, samples=2,
                                        max_new_tokens=12, checkpoints=f"lora={out}", device="cpu"))
    assert results["lora"]["n"] == 4


def test_lora_resume_equals_an_uninterrupted_run(tiny_run):
    stage5.main(lora_config(tiny_run, name="lora_straight", steps=3, kl_beta=0.0))
    stage5.main(lora_config(tiny_run, name="lora_killed", steps=3, kl_beta=0.0), stop_after=2)
    stage5.main(lora_config(tiny_run, name="lora_killed", steps=3, kl_beta=0.0, resume=True))
    a = stage1.load_policy(str(tiny_run["dir"] / "lora_straight" / "policy"), "cpu")[0].state_dict()
    b = stage1.load_policy(str(tiny_run["dir"] / "lora_killed" / "policy"), "cpu")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_vision_tower_full_finetuning_keeps_the_vision_weights(tiny_run):
    cfg = lora_config(tiny_run, name="frozen_vision", lora_rank=0, kl_beta=0.1, freeze_vision_tower=True,
                      gradient_checkpointing=True, logprob_chunk=8, pi_old="recompute")
    stage5.main(cfg)
    before = stage1.load_policy(str(tiny_run["dir"] / "policy_sft"), "cpu")[0].state_dict()
    after = stage1.load_policy(str(tiny_run["dir"] / "frozen_vision" / "policy"), "cpu")[0].state_dict()
    visual = [k for k in before if ".visual." in k]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert not all(torch.equal(before[k], after[k]) for k in before if k not in visual)  # the rest trained
    rows = stage1.read_jsonl(tiny_run["dir"] / "frozen_vision" / "metrics.jsonl")
    assert rows[0]["clipped"] == 0.0  # pi_old recomputed by the update's own forward: ratio 1 on the first update
