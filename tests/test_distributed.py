"""Stage 5 on two ranks (torchrun, gloo, CPU): one step on 2 ranks x P/2 prompts gives the weights one process gives
with the same P prompts and the same samples, for ddp, fsdp and ddp + LoRA; a 2-rank fsdp run stopped after its
checkpoint resumes to the weights of an uninterrupted one; stage 6 evaluates the policy it wrote.

The same samples: a rank samples its own prompts with its own seed, so one process and two ranks would draw different
completions. The equivalence runs therefore sample with `per_prompt_sampler`: stage 2's own sampler, one prompt at a
time, seeded by that prompt's tokens and pixels, so a prompt gets the same completions and log-probs whichever rank
or batch samples it. Everything after the sampler (rewards, HRAS, the update, the checkpoint) is stage 5's own code.

This file is also the script torchrun runs on the two ranks (the bottom of the file); the tests launch it once.
"""
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from conftest import copy_of_tiny_run, load_stage

stage1, stage2, stage5, stage6 = (load_stage(f) for f in ("01_sft_rm.py", "02_rollout.py", "05_grpo_train.py",
                                                            "06_eval.py"))
ROOT = Path(__file__).resolve().parent.parent
# one step; micro-batches of 4 rows split one process's 12 rows 4+4+4 and each rank's 6 rows 4+2, so the test also
# checks that micro-batches on two ranks add up to the global token mean; kl_beta > 0 runs the reference too
EQUIVALENCE = dict(run="tiny", steps=1, prompts_per_step=4, group_size=3, max_new_tokens=24, micro_batch_size=4,
                   lr=1e-3, kl_beta=0.05, checkpoint_every=1, save_rollouts_every=1, device="cpu")
RESUME = dict(run="tiny", steps=3, prompts_per_step=4, group_size=3, max_new_tokens=24, lr=1e-3, checkpoint_every=2,
              save_rollouts_every=100, parallel="fsdp", device="cpu")


def per_prompt_sampler(fast, device):
    """stage2.sampler's replacement: sample_completions on each prompt alone (left padding removed), with a generator
    seeded by the prompt's content; the rows padded to a common length. Same arguments and returns."""
    def sample(model, prompt, group_size, max_new_tokens, stop_ids, forbidden_ids, pad_id, temperature=1.0, top_k=0,
               top_p=1.0, generator=None):
        outs = []
        for b in range(prompt["input_ids"].shape[0]):
            one = stage5.prompt_rows(prompt, [b])
            real = one["attention_mask"][0].bool()  # drop this batch's left padding: the same input in any batch
            one = {**one, **{k: one[k][:, real] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}}
            seed = zlib.crc32(one["input_ids"].numpy().tobytes() + one["pixel_values"].numpy().tobytes())
            outs.append(stage2.sample_completions(model, one, group_size, max_new_tokens, stop_ids, forbidden_ids,
                                                  pad_id, temperature, top_k, top_p,
                                                  torch.Generator(device=device).manual_seed(seed)))
        width = max(o[0].shape[1] for o in outs)
        padded = [[torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t, fill in
                   zip(o[:3], (pad_id, 0, 0.0))] for o in outs]
        return (*(torch.cat(parts) for parts in zip(*padded)), torch.cat([o[3] for o in outs]))
    return sample


def two_rank_runs(runs_dir: str) -> None:
    """What each of the two ranks runs (torchrun starts this file twice)."""
    real_sampler = stage2.sampler
    stage2.sampler = per_prompt_sampler
    for name, extra in [("ddp", {"parallel": "ddp"}), ("fsdp", {"parallel": "fsdp"}),
                        ("ddp_lora", {"parallel": "ddp", "lora_rank": 4, "lora_alpha": 8.0})]:
        started = time.time()
        stage5.main(stage5.Config(**{**EQUIVALENCE, **extra}, runs_dir=runs_dir, name=name))
        print(f"two ranks, {name}: {time.time() - started:.1f} s", flush=True)
    stage2.sampler = real_sampler  # the resume runs sample as stage 5 does: a seed per rank
    stage5.main(stage5.Config(**RESUME, runs_dir=runs_dir, name="fsdp_straight"))
    stage5.main(stage5.Config(**RESUME, runs_dir=runs_dir, name="fsdp_killed"), stop_after=3)  # checkpoint at 2
    stage5.main(stage5.Config(**RESUME, runs_dir=runs_dir, name="fsdp_killed", resume=True))


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The two-rank runs (one torchrun launch) and their one-process twins, in a copy of the tiny stage-1 run."""
    runs_dir = tmp_path_factory.mktemp("dist_runs")
    copy_of_tiny_run(tiny_run, runs_dir)
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          __file__, str(runs_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    print(f"\ntorchrun, 2 ranks: {time.time() - started:.1f} s\n" + "".join(
        line + "\n" for line in out.stdout.splitlines() if line.startswith("two ranks")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage2, "sampler", per_prompt_sampler)
        for name, extra in [("one", {}), ("one_lora", {"lora_rank": 4, "lora_alpha": 8.0})]:
            started = time.time()
            stage5.main(stage5.Config(**{**EQUIVALENCE, **extra}, runs_dir=str(runs_dir), name=name))
            print(f"one process, {name}: {time.time() - started:.1f} s")
    return runs_dir / "tiny"


def weights(folder: Path) -> dict:
    return stage1.load_policy(str(folder), "cpu")[0].state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("mode, one", [("ddp", "one"), ("fsdp", "one"), ("ddp_lora", "one_lora")])
def test_two_ranks_give_the_one_process_update(runs, mode, one):
    alone, two = weights(runs / one / "policy"), weights(runs / mode / "policy")
    moved = max_difference(alone, weights(runs / "policy_sft")) if one == "one" else max(
        float(alone[k].abs().max()) for k in alone if "lora_B" in k)  # LoRA's B starts at 0
    difference = max_difference(alone, two)
    print(f"{mode}: max |one process - two ranks| = {difference:.2e}; the step moved weights by up to {moved:.2e}")
    assert moved > 1e-4  # the step did move the weights (Adam's first step: about lr = 1e-3 per weight)
    assert difference < 1e-5
    # one line per step, averaged over ranks: the same rewards (whole groups on each rank) and loss as one process
    row_one, row_two = stage1.read_jsonl(runs / one / "metrics.jsonl"), stage1.read_jsonl(runs / mode / "metrics.jsonl")
    assert len(row_two) == 1 and row_two[0]["step"] == 1
    for key in ("reward_task", "reward_consistency", "accuracy", "completion_length", "constant_task_groups", "zero_advantage_groups"):
        assert row_two[0][key] == pytest.approx(row_one[0][key], abs=1e-6), key
    assert row_two[0]["loss"] == pytest.approx(row_one[0]["loss"], abs=1e-6)


def test_two_rank_fsdp_run_resumes_after_its_checkpoint_and_stage6_evaluates_it(runs):
    straight, resumed = weights(runs / "fsdp_straight" / "policy"), weights(runs / "fsdp_killed" / "policy")
    assert max_difference(straight, resumed) == 0.0  # the lost step 3 was redone exactly, on both ranks
    assert [r["step"] for r in stage1.read_jsonl(runs / "fsdp_killed" / "metrics.jsonl")] == [1, 2, 3]
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(runs.parent), n=2, samples=2, max_new_tokens=12,
                                        checkpoints=f"fsdp={runs / 'fsdp_straight' / 'policy'}", device="cpu"))
    assert results["fsdp"]["n"] == 4


if __name__ == "__main__":  # torchrun --nproc-per-node 2 tests/test_distributed.py <runs dir>
    two_rank_runs(sys.argv[1])
