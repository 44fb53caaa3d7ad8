"""Stage 4: advantages. Plain GRPO, sum-then-normalise, and HRAS (Hybrid Reward Advantage Splitting).

Rows are grouped contiguously: prompt k's G rollouts are rows k*G ... k*G+G-1.
Within each group, with the sample standard deviation (divides by G - 1):

  z(r)_i    = (r_i - mean(r)) / (std(r) + eps),   and exactly 0 when the group's rewards are all equal
  grpo      A_i = z(r_task)_i                               (baseline: the task reward alone)
  sum       A_i = z(r_task + r_cons)_i                      (the paper's "without HRAS" ablation)
  hras      A_i = alpha * z(r_task)_i + beta_t * z(r_cons)_i

Why HRAS: r_task is sparse (0/1/2) and r_cons continuous. Summed before normalising, in a group
where every answer is right the continuous part alone sets the advantages at full scale, and in
a mixed group a large lambda_cons swamps accuracy; normalising each reward in its own group
first keeps both signals at unit scale and lets alpha, beta weigh them explicitly.
So stage 3's lambda_cons (r_cons = lambda_cons * P) only matters for `sum`: under hras the z-score drops
the scale, z(lambda P) = (P - mean P) / (std P + cons_eps / lambda), the same for every lambda > 0 up to
cons_eps, and lambda = 0 makes r_cons constant (z = 0, HRAS = GRPO); grpo never reads r_cons.
beta_t may follow a schedule over training (constant, linear warm-up, linear decay): the paper
mentions warm-up and decay without shapes, so these shapes are our choice.

Pinned conventions (the sources leave them open; the peers disagree): sample std, eps = 1e-6,
an all-equal group gets exactly 0, no gating by correctness.
A trap of z-scoring a continuous reward: once a policy is mostly consistent, a group's CRM
probabilities may all be ~0.9989 and differ only in the 6th decimal (float noise of batched
inference), yet the z-score scales that noise up to unit size, as large as the accuracy signal.
cons_eps (the eps of z(r_cons) alone; default eps) damps it: with cons_eps = 0.05 a spread of 1e-6
gives advantages of ~1e-5, while a group of 8 with one inconsistent member (std 0.354) keeps 88 %
of its scale. The defaults keep eps; docs/LOG.md gives what 0.05 measured.

Two different "nothing to learn" counts (zero_variance_stats): groups whose task reward is constant
(every answer right, or every one wrong: GRPO's advantages are all 0 there), and groups whose final
advantages are all 0. Under hras the second stays near zero even when the first is large, because the
CRM's probabilities differ (if only by float noise) and z(r_cons) is then not 0.

Rewards must be finite: one NaN makes its whole group's advantages NaN, so a non-finite reward is an
error that names its prompt row and completion, never a NaN written to disk.

Reads:  runs/<run>/rewards.jsonl (03_rewards.py).
Writes: runs/<run>/advantages.jsonl, one row per prompt: the advantages and both z-scores. An empty or
        broken rewards.jsonl stops the stage before anything is written (the old advantages.jsonl stays).
Run:    python 04_hras.py [--advantage hras --alpha 1.0 --beta 1.0]
"""
import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch


# Earlier stages, by file name: "01_sft_rm" cannot follow `import`, but import_module takes it (the
# stages' folder is on sys.path when one runs as a script). Imports flow forward only.
stage1 = importlib.import_module("01_sft_rm")


@dataclass
class Config:
    run: str = "default"  # run folder: runs/<run>/
    runs_dir: str = "runs"  # parent folder of all runs
    advantage: str = "hras"  # hras | grpo | sum
    alpha: float = 1.0  # weight of the task advantage (hras)
    beta: float = 1.0  # weight of the consistency advantage (hras), before the schedule
    eps: float = 1e-6  # added to the group std
    cons_eps: float = 1e-6  # added to the group std of r_cons in hras (e.g. 0.05 damps CRM noise; see above)


def check_config(cfg: Config) -> None:
    """Refuse flags that would give NaN or infinite advantages, before anything is read."""
    if cfg.advantage not in ("hras", "grpo", "sum"):
        raise SystemExit(f"--advantage {cfg.advantage}: use hras, grpo or sum.")
    for flag, value in [("--alpha", cfg.alpha), ("--beta", cfg.beta)]:
        if not math.isfinite(value):
            raise SystemExit(f"{flag} {value}: must be a finite number.")
    for flag, value in [("--eps", cfg.eps), ("--cons-eps", cfg.cons_eps)]:
        if not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"{flag} {value}: must be a finite number >= 0 (it is added to a std).")


def check_finite(name: str, rewards: torch.Tensor) -> None:
    """A ValueError naming the indices of non-finite rewards: one NaN would make its whole group NaN."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name} must be finite: {len(bad)} are not, at indices {bad[:10]} "
                         f"(values {rewards[bad[:10]].tolist()}).")


def group_zscore(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group sample std + eps); all-equal groups get 0. rewards: (N,) -> (N,).

    Example (G = 4): [1, 0, 0, 0] -> mean 0.25, sample std sqrt(0.75 / 3) = 0.5
                     -> [1.5, -0.5, -0.5, -0.5] (to 1e-5, from eps).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"expected a 1-D tensor whose length is a multiple of group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    check_finite("rewards", rewards)
    groups = rewards.float().view(-1, group_size)  # (K, G)
    mean = groups.mean(dim=1, keepdim=True)  # (K, 1)
    std = groups.std(dim=1, keepdim=True, unbiased=True)  # (K, 1)
    z = (groups - mean) / (std + eps)  # (K, G)
    all_equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # (K, 1)
    return torch.where(all_equal, torch.zeros_like(z), z).view(-1)  # (N,)


def grpo_advantages(task_rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Plain GRPO: the task reward alone. (N,) -> (N,)"""
    return group_zscore(task_rewards, group_size, eps)


def summed_advantages(task_rewards: torch.Tensor, consistency_rewards: torch.Tensor, group_size: int,
                      eps: float = 1e-6) -> torch.Tensor:
    """Sum the rewards, then normalise (the ablation without HRAS). (N,), (N,) -> (N,)

    Example (G = 4): task [1, 1, 0, 0] + cons [0.9, 0.1, 0.8, 0.2] = [1.9, 1.1, 0.8, 0.2]
                     -> mean 1.0, sample std sqrt(1.50 / 3) = 0.7071 -> [1.2728, 0.1414, -0.2828, -1.1314].
    """
    return group_zscore(task_rewards + consistency_rewards, group_size, eps)


def hras_advantages(task_rewards: torch.Tensor, consistency_rewards: torch.Tensor, group_size: int,
                    alpha: float = 1.0, beta: float = 1.0, eps: float = 1e-6,
                    cons_eps: float | None = None) -> torch.Tensor:
    """alpha * z(task) + beta * z(consistency), each z-scored within its group. (N,), (N,) -> (N,)

    Example (G = 4): task [1, 1, 0, 0] -> z = +-0.8660 (mean 0.5, std sqrt(1/3) = 0.5774);
                     cons [0.9, 0.1, 0.8, 0.2] -> z = [0.9798, -0.9798, 0.7348, -0.7348]
                     (mean 0.5, std sqrt(0.50 / 3) = 0.4082);  alpha = beta = 1
                     -> [1.8458, -0.1138, -0.1312, -1.6009].
    cons_eps replaces eps in z(consistency) (None: eps).
    """
    z_task = group_zscore(task_rewards, group_size, eps)  # (N,)
    z_cons = group_zscore(consistency_rewards, group_size, eps if cons_eps is None else cons_eps)  # (N,)
    return alpha * z_task + beta * z_cons


def consistency_weight(step: int, total_steps: int, beta: float, schedule: str = "constant",
                       warmup_steps: int = 0) -> float:
    """beta_t: `constant` beta; `warmup` 0 -> beta linearly over warmup_steps, then beta;
    `decay` beta linearly down to 0 at total_steps.

    Example: beta = 1, total 100, warmup 10: warmup at step 5 -> 0.5, at 20 -> 1.0; decay at 25 -> 0.75.
    """
    if schedule == "constant":
        return beta
    if schedule == "warmup":
        return beta if warmup_steps <= 0 else beta * min(1.0, step / warmup_steps)
    if schedule == "decay":
        return beta * max(0.0, 1.0 - step / max(1, total_steps))
    raise ValueError(f"unknown consistency schedule {schedule!r}: use constant, warmup or decay")


def advantages(method: str, task: torch.Tensor, consistency: torch.Tensor, group_size: int,
               alpha: float = 1.0, beta: float = 1.0, eps: float = 1e-6,
               cons_eps: float | None = None) -> torch.Tensor:
    """Dispatch on --advantage. (N,), (N,) -> (N,). A non-finite reward is a ValueError naming its index."""
    check_finite("task rewards", task)
    if method in ("sum", "hras"):
        check_finite("consistency rewards", consistency)
    if method == "grpo":
        return grpo_advantages(task, group_size, eps)
    if method == "sum":
        return summed_advantages(task, consistency, group_size, eps)
    if method == "hras":
        return hras_advantages(task, consistency, group_size, alpha, beta, eps, cons_eps)
    raise ValueError(f"unknown advantage {method!r}: use hras, grpo or sum")


def zero_variance_stats(task: torch.Tensor, advantages: torch.Tensor, group_size: int) -> dict[str, float]:
    """Shares of the groups with nothing to learn, in two senses. (N,), (N,) -> two floats in [0, 1]:
      constant_task_groups   the task reward is the same for every rollout of the group
      zero_advantage_groups  every final advantage of the group is exactly 0

    Example (G = 2): task [1, 1 | 1, 0] with hras advantages [0.7, -0.7 | 1.4, -1.4] -> constant task 1/2
             = 0.5, zero advantages 0/2 = 0.0 (z(r_cons) moves the first group); with grpo's advantages
             [0, 0 | 0.7, -0.7] -> 0.5 and 0.5.
    """
    constant = (task.view(-1, group_size) == task.view(-1, group_size)[:, :1]).all(dim=1)  # (K,)
    zero = (advantages.view(-1, group_size) == 0).all(dim=1)  # (K,)
    return {"constant_task_groups": constant.float().mean().item(),
            "zero_advantage_groups": zero.float().mean().item()}


def check_rewards(prompts: list[dict], path: Path) -> int:
    """The group size G, or a stop before anything is written that names the file and the prompt: no prompts,
    a missing or non-numeric reward, groups of unequal size or of one."""
    remake = f"Rerun `{stage1.stage_command('03_rewards.py', path.parent)}` to remake {path.name}."
    if not prompts:
        raise SystemExit(f"{path} holds no prompts: nothing to normalise. {remake}")
    for number, p in enumerate(prompts, start=1):
        records = p.get("rewards") if isinstance(p, dict) else None
        numeric = isinstance(records, list) and all(
            isinstance(r, dict) and all(type(r.get(key)) in (int, float) for key in ("task", "consistency"))
            for r in records)
        if not (numeric and records and "row" in p):
            raise SystemExit(f"{path}, prompt {number}: expected a row and a non-empty list of rewards, each "
                             f"with a numeric task and consistency. {remake}")
    sizes = {len(p["rewards"]) for p in prompts}
    if len(sizes) != 1:
        raise SystemExit(f"{path}: every prompt needs the same number of completions, got {sorted(sizes)}.")
    group_size = sizes.pop()
    if group_size < 2:
        raise SystemExit(f"{path}: a group of one completion has no baseline: sample G >= 2 per prompt "
                         f"(02_rollout.py --group-size).")
    return group_size


def non_finite_rows(values: torch.Tensor, prompts: list[dict], group_size: int) -> list[str]:
    """Where values (N,) are NaN or infinite, as 'prompt row R, completion j' (flat i = prompt i // G)."""
    return [f"prompt row {prompts[i // group_size]['row']}, completion {i % group_size}"
            for i in (~torch.isfinite(values)).nonzero().flatten().tolist()]


def main(cfg: Config) -> list[dict]:
    check_config(cfg)
    run_dir = Path(cfg.runs_dir) / cfg.run
    path = stage1.require(run_dir / "rewards.jsonl", stage1.stage_command("03_rewards.py", run_dir))
    prompts = stage1.read_jsonl(path)
    group_size = check_rewards(prompts, path)
    task = torch.tensor([r["task"] for p in prompts for r in p["rewards"]])  # (N,)
    consistency = torch.tensor([r["consistency"] for p in prompts for r in p["rewards"]])  # (N,)
    for name, values in [("task", task), ("consistency", consistency)]:
        bad = non_finite_rows(values, prompts, group_size)
        if bad:  # one NaN would make its whole group's advantages NaN
            raise SystemExit(f"{path}: {len(bad)} {name} rewards are NaN or infinite ({'; '.join(bad[:5])}). "
                             f"Nothing was written. Find what scored them (03_rewards.py) and rerun it.")
    adv = advantages(cfg.advantage, task, consistency, group_size, cfg.alpha, cfg.beta, cfg.eps,
                     cfg.cons_eps)  # (N,)
    task_z = group_zscore(task, group_size, cfg.eps)  # (N,)
    cons_z = group_zscore(consistency, group_size, cfg.cons_eps)  # (N,)

    rows = []
    for k, p in enumerate(prompts):
        span = slice(k * group_size, (k + 1) * group_size)
        rows.append({"row": p["row"], "advantages": [round(a, 6) for a in adv[span].tolist()],
                     "task_z": [round(a, 6) for a in task_z[span].tolist()],
                     "consistency_z": [round(a, 6) for a in cons_z[span].tolist()]})
    stage1.write_jsonl_atomic(run_dir / "advantages.jsonl", rows)

    groups = zero_variance_stats(task, adv, group_size)
    print(f"\n{cfg.advantage} advantages for {len(rows)} groups of {group_size}: mean {adv.mean():.4f}, "
          f"std {adv.std():.4f}, min {adv.min():.3f}, max {adv.max():.3f}")
    print(f"groups with a constant task reward {groups['constant_task_groups']:.3f}, "
          f"with all advantages zero {groups['zero_advantage_groups']:.3f}")
    print(f"wrote {run_dir / 'advantages.jsonl'}")
    return rows


if __name__ == "__main__":
    main(stage1.parse_config(Config, __doc__.split("\n")[0]))
