"""Stage 4: advantages against hand-computed values (the arithmetic is in the comments)."""
import pytest
import torch

from conftest import load_stage

hras = load_stage("04_hras.py")
T = torch.tensor


def close(a, b, tol=1e-4):
    return torch.allclose(a, T(b), atol=tol)


def test_single_success_in_a_group_of_four():
    # mean 0.25; deviations [0.75, -0.25, -0.25, -0.25]; squares sum 0.75; sample var 0.75/3 = 0.25; std 0.5
    # z = [0.75/0.5, -0.25/0.5 x3] = [1.5, -0.5, -0.5, -0.5]   (eps 1e-6 moves the 6th decimal only)
    assert close(hras.group_zscore(T([1.0, 0, 0, 0]), 4), [1.5, -0.5, -0.5, -0.5])
    assert close(hras.grpo_advantages(T([1.0, 0, 0, 0]), 4), [1.5, -0.5, -0.5, -0.5])
    # with eps 1e-4 (TRL's), as in grpo_reference.md: 0.75 / 0.5001 = 1.4997, -0.25 / 0.5001 = -0.4999
    assert close(hras.group_zscore(T([1.0, 0, 0, 0]), 4, eps=1e-4), [1.4997, -0.4999, -0.4999, -0.4999])


def test_hras_on_two_right_two_wrong_with_consistency():
    task, cons = T([1.0, 1, 0, 0]), T([0.9, 0.1, 0.8, 0.2])
    # task: mean 0.5, deviations +-0.5, sample var (4 * 0.25) / 3 = 1/3, std 0.57735 -> z = +-0.8660
    # cons: mean 0.5, deviations [0.4, -0.4, 0.3, -0.3], squares 0.5, var 0.5/3, std 0.40825
    #       -> z = [0.9798, -0.9798, 0.7348, -0.7348]
    # hras (alpha = beta = 1) = [0.8660 + 0.9798, 0.8660 - 0.9798, -0.8660 + 0.7348, -0.8660 - 0.7348]
    assert close(hras.hras_advantages(task, cons, 4), [1.8458, -0.1138, -0.1312, -1.6009])
    # alpha 2, beta 0.5: [1.7321 + 0.4899, 1.7321 - 0.4899, -1.7321 + 0.3674, -1.7321 - 0.3674]
    assert close(hras.hras_advantages(task, cons, 4, alpha=2.0, beta=0.5), [2.2220, 1.2422, -1.3646, -2.0995])
    # sum: [1.9, 1.1, 0.8, 0.2], mean 1.0, deviations [0.9, 0.1, -0.2, -0.8], squares 1.5, var 0.5, std 0.70711
    assert close(hras.summed_advantages(task, cons, 4), [1.2728, 0.1414, -0.2828, -1.1314])


def test_a_constant_reward_contributes_nothing():
    # every answer right: task is constant -> z(task) = 0 exactly; HRAS keeps the consistency signal
    task, cons = T([1.0, 1, 1, 1]), T([0.9, 0.1, 0.8, 0.2])
    assert torch.equal(hras.group_zscore(task, 4), torch.zeros(4))
    assert close(hras.hras_advantages(task, cons, 4), [0.9798, -0.9798, 0.7348, -0.7348])
    assert torch.equal(hras.grpo_advantages(task, 4), torch.zeros(4))  # plain GRPO learns nothing here
    # constant consistency (e.g. all unparseable -> 0): z(cons) = 0, HRAS reduces to GRPO
    assert torch.equal(hras.hras_advantages(T([1.0, 0, 0, 0]), torch.zeros(4), 4), hras.grpo_advantages(T([1.0, 0, 0, 0]), 4))
    # floating-point equal values (0.1 + 0.2) still count as equal
    assert torch.equal(hras.group_zscore(T([0.3, 0.3, 0.3]), 3), torch.zeros(3))


def test_groups_are_contiguous_and_independent():
    # rows 0-3 are prompt 0, rows 4-7 prompt 1: [0, 1 | 5, 5] with G = 2
    # group 0: mean 0.5, sample std sqrt(0.5) = 0.7071 -> [-0.7071, 0.7071]; group 1: all equal -> 0
    assert close(hras.group_zscore(T([0.0, 1, 5, 5]), 2), [-0.7071, 0.7071, 0, 0])


def test_bad_group_sizes_raise():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        hras.group_zscore(T([1.0, 0]), 1)
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        hras.group_zscore(T([1.0, 0, 0, 0, 1, 0]), 4)
    with pytest.raises(ValueError, match="unknown advantage"):
        hras.advantages("ppo", T([1.0, 0]), T([1.0, 0]), 2)


def test_consistency_weight_schedules():
    # constant: always beta
    assert hras.consistency_weight(0, 100, 0.5, "constant") == 0.5
    assert hras.consistency_weight(99, 100, 0.5, "constant") == 0.5
    # warmup over 10 steps: 0 at step 0, 0.5 * 4/10 = 0.2 at step 4, beta from step 10 on
    assert hras.consistency_weight(0, 100, 0.5, "warmup", 10) == 0.0
    assert hras.consistency_weight(4, 100, 0.5, "warmup", 10) == pytest.approx(0.2)
    assert hras.consistency_weight(10, 100, 0.5, "warmup", 10) == 0.5
    assert hras.consistency_weight(50, 100, 0.5, "warmup", 10) == 0.5
    # decay: beta * (1 - step/total): 0.5 at 0, 0.5 * 0.75 = 0.375 at 25, 0 at 100
    assert hras.consistency_weight(0, 100, 0.5, "decay") == 0.5
    assert hras.consistency_weight(25, 100, 0.5, "decay") == pytest.approx(0.375)
    assert hras.consistency_weight(100, 100, 0.5, "decay") == 0.0
    with pytest.raises(ValueError, match="unknown consistency schedule"):
        hras.consistency_weight(0, 10, 1.0, "cosine")


def test_cons_eps_damps_noise_in_an_all_consistent_group():
    # consistency [0.999, 0.998, 0.999, 0.998]: mean 0.9985, deviations +-0.0005,
    # sample var 4 * 0.0005^2 / 3 = 3.3333e-7, std 5.7735e-4
    task, cons = T([1.0, 1, 1, 1]), T([0.999, 0.998, 0.999, 0.998], dtype=torch.float64)
    # eps 1e-6: z = +-0.0005 / (5.7735e-4 + 1e-6) = +-0.86453: noise at the scale of a real signal
    assert close(hras.hras_advantages(task, cons, 4).float(), [0.8645, -0.8645, 0.8645, -0.8645])
    # cons_eps 0.05: z = +-0.0005 / (5.7735e-4 + 0.05) = +-0.0098858
    assert close(hras.hras_advantages(task, cons, 4, cons_eps=0.05).float(), [0.009886, -0.009886, 0.009886, -0.009886],
                 tol=1e-6)
    # a group of 8, one inconsistent: [0, 1 x7]: mean 0.875, sample var (0.875^2 + 7 * 0.125^2) / 7 = 0.125,
    # std 0.35355; z of the inconsistent one: -0.875 / 0.35355 = -2.4749, with cons_eps 0.05: -0.875 / 0.40355 = -2.1682
    cons8, task8 = T([0.0] + [1.0] * 7), T([1.0] * 8)
    assert hras.hras_advantages(task8, cons8, 8)[0].item() == pytest.approx(-2.4749, abs=1e-4)
    assert hras.hras_advantages(task8, cons8, 8, cons_eps=0.05)[0].item() == pytest.approx(-2.1682, abs=1e-4)
    # the task z-score keeps eps: [1, 0, 0, 0] gives 1.5 as before, whatever cons_eps
    assert hras.hras_advantages(T([1.0, 0, 0, 0]), torch.zeros(4), 4, cons_eps=0.05)[0].item() == pytest.approx(1.5, abs=1e-4)


def test_zero_variance_stats_count_constant_task_groups_and_all_zero_advantages_apart():
    # three groups of 4:
    #   g0 every answer right, CRM probabilities differing in the 3rd decimal -> constant task, z(cons) = +-0.8645
    #   g1 one right of four -> task not constant
    #   g2 every answer wrong, CRM 0.5 everywhere -> constant task and constant consistency
    task = T([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    cons = T([0.999, 0.998, 0.999, 0.998, 0.9, 0.1, 0.8, 0.2, 0.5, 0.5, 0.5, 0.5])
    # grpo: g0 and g2 get z(task) = 0 exactly -> 2 of 3 groups constant, 2 of 3 all zero
    grpo = hras.advantages("grpo", task, cons, 4)
    assert hras.zero_variance_stats(task, grpo, 4) == pytest.approx(
        {"constant_task_groups": 2 / 3, "zero_advantage_groups": 2 / 3})
    # hras: g0 keeps z(cons) = +-0.8645 (noise scaled up), only g2 is all zero -> 2/3 constant, 1/3 all zero
    adv = hras.advantages("hras", task, cons, 4)
    assert hras.zero_variance_stats(task, adv, 4) == pytest.approx(
        {"constant_task_groups": 2 / 3, "zero_advantage_groups": 1 / 3})
    # sum: g0's summed reward [1.999, 1.998, ...] is not constant either -> the same as hras
    summed = hras.advantages("sum", task, cons, 4)
    assert hras.zero_variance_stats(task, summed, 4)["zero_advantage_groups"] == pytest.approx(1 / 3)


def test_lambda_cons_changes_hras_only_through_cons_eps_and_sum_always():
    # z(lambda * c) = (c - mean c) / (std c + cons_eps / lambda): with eps 1e-6 the scale is invisible
    task, cons = T([1.0, 1, 0, 0]), T([0.9, 0.1, 0.8, 0.2])
    base = hras.hras_advantages(task, cons, 4)
    assert torch.allclose(hras.hras_advantages(task, 5.0 * cons, 4), base, atol=1e-4)  # [1.8458, -0.1138, ...]
    assert torch.allclose(hras.hras_advantages(task, 0.0 * cons, 4), hras.grpo_advantages(task, 4))  # 0: off
    # with cons_eps 0.05 lambda shows: std 0.40825; lambda 1 -> 0.4 / 0.45825 = 0.8729; lambda 5 -> 2 / 2.09125
    # = 0.9564 (= 0.4 / (0.40825 + 0.01)); z(task) = 0.8660 either way
    assert hras.hras_advantages(task, cons, 4, cons_eps=0.05)[0].item() == pytest.approx(0.8660 + 0.8729, abs=1e-3)
    assert hras.hras_advantages(task, 5 * cons, 4, cons_eps=0.05)[0].item() == pytest.approx(0.8660 + 0.9564, abs=1e-3)
    # sum: task + 5 cons = [5.5, 1.5, 4, 1], mean 3, deviations [2.5, -1.5, 1, -2], squares 13.5, var 4.5,
    # std 2.1213 -> first z = 2.5 / 2.1213 = 1.1785 (lambda 1 gave 1.2728: under sum the scale changes the advantages)
    assert hras.summed_advantages(task, 5 * cons, 4)[0].item() == pytest.approx(1.1785, abs=1e-4)
