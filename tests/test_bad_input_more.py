"""Bad input, the rest: a checkpoint that does not load is named and skipped by stage 6; torchrun runs stage 5
with the stage's own flags (--run); stages 2, 3, 5 and 6 check paths, models, devices, LoRA targets and
benchmarks before any model loads; a full disk during a checkpoint says so and loses nothing; the fix commands
of stages 3 and 4 name the run; the seconds metric goes on after a resume."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT, copy_of_tiny_run, load_stage

stage1, stage2, stage3, stage4, stage5, stage6 = (
    load_stage(f) for f in ("01_sft_rm.py", "02_rollout.py", "03_rewards.py", "04_hras.py",
                            "05_grpo_train.py", "06_eval.py"))


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """A copy of the tiny stage-1 run, so the runs and files made here touch no other test's folder."""
    return copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("more_bad_input_runs"))


@pytest.fixture
def no_models(monkeypatch):
    """Any model load fails the test: the errors below must come before one."""
    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    for name in ("load_policy", "load_crm"):
        monkeypatch.setattr(stage1, name, fail)


def small(run_copy, **overrides):
    base = dict(run="tiny", runs_dir=str(run_copy.parent), steps=2, prompts_per_step=2, group_size=2,
                max_new_tokens=8, checkpoint_every=1, sample_every=100, device="cpu")
    return stage5.Config(**{**base, **overrides})


# ------------------------------------------------------------- 1. stage 6: a checkpoint that does not load
def test_stage6_names_and_skips_a_checkpoint_cut_short_and_evaluates_the_others(run_copy, capsys):
    cut = run_copy / "cut_seed0" / "policy"
    shutil.copytree(run_copy / "policy_sft", cut)
    weights = cut / "model.safetensors"
    with open(weights, "r+b") as f:  # a copy that died half way, or a full disk
        f.truncate(weights.stat().st_size // 2)
    results = stage6.main(stage6.Config(run="tiny", runs_dir=str(run_copy.parent), n=2, samples=2,
                                        max_new_tokens=8, examples=0, device="cpu"))
    assert "cut_seed0" not in results and results["sft"]["n"] == 4  # the good checkpoint is evaluated
    out = capsys.readouterr().out
    assert f"skipping cut_seed0 ({cut}): it does not load: {weights} is cut short or corrupt" in out
    saved = json.loads((run_copy / "eval.json").read_text())
    assert "incomplete metadata" in saved["skipped"]["cut_seed0"] and "sft" in saved["checkpoints"]
    assert f"Skipped cut_seed0: it does not load: {weights}" in (run_copy / "eval.md").read_text()
    shutil.rmtree(run_copy / "cut_seed0")


