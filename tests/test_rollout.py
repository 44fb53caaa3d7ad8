"""Stage 2: our hand-written sampler against transformers (generate, a teacher-forced forward)."""
import torch
from PIL import Image

from conftest import load_stage

stage2 = load_stage("02_rollout.py")
stage1 = load_stage("01_sft_rm.py")
stage5 = load_stage("05_grpo_train.py")


def mixed_batch(processor):
    """Different image sizes (4, 9 and 12 image tokens) and question lengths -> different prompt lengths."""
    images = [Image.new("RGB", (56, 56), "white"), Image.effect_noise((84, 84), 60).convert("RGB"),
              Image.effect_noise((112, 84), 90).convert("RGB")]
    questions = ["How many red shapes are there?", "Which bar is the tallest: A, B or C?", "How many?"]
    return stage1.encode_prompts(processor, images, questions)


def first_stop_cut(row: list[int], stop_ids: list[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def test_greedy_equals_generate(policy):
    model, processor = policy
    prompt = mixed_batch(processor)
    assert len(set(prompt["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths: padding is exercised
    stop_ids, pad = stage1.stop_token_ids(processor), processor.tokenizer.pad_token_id
    ids, mask, _, _ = stage2.sample_completions(model, prompt, 1, 24, stop_ids, [], pad, temperature=0.0)
    expected = model.generate(**prompt, max_new_tokens=24, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad)
    expected = expected[:, prompt["input_ids"].shape[1]:]
    for i in range(3):
        ours = ids[i][mask[i].bool()].tolist()
        assert ours == first_stop_cut(expected[i].tolist(), stop_ids)


def test_sampling_logprobs_equal_a_teacher_forced_forward(policy):
    model, processor = policy
    prompt = mixed_batch(processor)
    G, T = 2, 0.7
    generator = torch.Generator().manual_seed(0)
    ids, mask, logprobs, _ = stage2.sample_completions(
        model, prompt, G, 20, stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor),
        processor.tokenizer.pad_token_id, temperature=T, generator=generator)
    expanded = stage5.prompt_rows(prompt, [r // G for r in range(ids.shape[0])])
    with torch.no_grad():
        forward = stage1.completion_logprobs(model, expanded, ids, mask, temperature=T)  # (N, L)
    assert torch.allclose(forward * mask, logprobs * mask, atol=1e-4)
    assert (logprobs[mask.bool()] < 0).all()


def test_same_seed_same_samples_and_group_rows_differ(tiny_policy):
    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    args = (model, prompt, 4, 20, stage1.stop_token_ids(processor), stage2.forbidden_token_ids(processor),
            processor.tokenizer.pad_token_id)
    a = stage2.sample_completions(*args, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = stage2.sample_completions(*args, temperature=1.5, generator=torch.Generator().manual_seed(7))
    c = stage2.sample_completions(*args, temperature=1.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[0], c[0])


def test_stop_masks_and_pads(tiny_policy):
    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    stop_ids, pad = stage1.stop_token_ids(processor), processor.tokenizer.pad_token_id
    ids, mask, logprobs, truncated = stage2.sample_completions(model, prompt, 3, 48, stop_ids, [], pad, temperature=1.0,
                                                               generator=torch.Generator().manual_seed(1))
    assert (~truncated).any()  # the fine-tuned policy stops on its own
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()  # the mask is a prefix
        assert (ids[i, n:] == pad).all() and (logprobs[i, n:] == 0).all()  # padding after it
        stops = [t for t in ids[i, :n].tolist() if t in stop_ids]
        assert stops == ([] if truncated[i] else [ids[i, n - 1].item()])  # cut at the first stop, included
    short = stage2.sample_completions(model, prompt, 1, 3, stop_ids, [], pad, temperature=0.0)
    assert short[1].shape == (3, 3) and short[3].all()  # a 3-token budget: every row truncated, mask all ones


def test_one_prefill_per_group_equals_separate_prefills(tiny_policy):
    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    args = (stage1.stop_token_ids(processor), [], processor.tokenizer.pad_token_id)
    single = stage2.sample_completions(model, prompt, 1, 16, *args, temperature=0.0)
    grouped = stage2.sample_completions(model, prompt, 3, 16, *args, temperature=0.0)
    for k in range(3):
        for g in range(3):
            row = 3 * k + g
            n = int(single[1][k].sum())
            assert grouped[0][row, :n].tolist() == single[0][k, :n].tolist()
            assert torch.allclose(grouped[2][row, :n], single[2][k, :n], atol=1e-5)


def test_forbidden_tokens_are_never_sampled(tiny_policy):
    model, processor = tiny_policy
    prompt = mixed_batch(processor)
    forbidden = stage2.forbidden_token_ids(processor)
    ids, mask, _, _ = stage2.sample_completions(model, prompt, 8, 24, stage1.stop_token_ids(processor), forbidden,
                                                processor.tokenizer.pad_token_id, temperature=5.0,
                                                generator=torch.Generator().manual_seed(0))
    assert not torch.isin(ids[mask.bool()], torch.tensor(forbidden)).any()


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(stage2.filter_top_k_top_p(logits, 2, 1.0)) == [True, True, False, False]
    # top-p 0.7: 0.5 < 0.7 so the second token is needed (0.8 >= 0.7), the third is not
    assert kept(stage2.filter_top_k_top_p(logits, 0, 0.7)) == [True, True, False, False]
    assert kept(stage2.filter_top_k_top_p(logits, 0, 0.4)) == [True, False, False, False]


def test_cli_writes_rollouts(tiny_run):
    records = stage2.main(stage2.Config(run="tiny", runs_dir=str(tiny_run["dir"].parent), n_prompts=3, group_size=2,
                                        max_new_tokens=16, device="cpu"))
    rows = stage1.read_jsonl(tiny_run["dir"] / "rollouts.jsonl")
    assert rows == records and len(rows) == 3 and all(len(r["completions"]) == 2 for r in rows)
    c = rows[0]["completions"][0]
    assert c["length"] == len(c["token_ids"]) == len(c["logprobs"])
