"""The chain-reading rule oracle (01_sft_rm.oracle_parts): worked examples from both embedded task families.

Each example states what the steps imply, what the thinking concludes and what the answer says; the oracle calls
a completion consistent only when both links hold (steps -> conclusion, conclusion -> answer)."""
import pytest

from conftest import load_stage

stage1 = load_stage("01_sft_rm.py")

COUNT = "I count the red shapes: {steps}. So the answer is {conclusion}."
BARS = "Heights: {steps}. So the answer is {conclusion}."


@pytest.mark.parametrize("think, answer, steps, answer_link", [
    # count: the listed count is 3 (1, 2, 3), the conclusion 3, the answer 3 -> both links hold
    (COUNT.format(steps="1, 2, 3", conclusion="3"), "3", True, True),
    # count: the steps list 3 shapes but conclude 5; the answer copies the conclusion -> the answer link holds,
    # the steps link does not (an oracle reading the conclusion only would call this consistent)
    (COUNT.format(steps="1, 2, 3", conclusion="5"), "5", False, True),
    # count: steps and conclusion agree on 3, the answer says 4 -> only the steps link holds
    (COUNT.format(steps="1, 2, 3", conclusion="3"), "4", True, False),
    # count: "1, 2, 4" skips 3, so the steps state no count: nothing follows from them
    (COUNT.format(steps="1, 2, 4", conclusion="3"), "3", False, True),
    # count: one shape listed, "1" -> a count of 1, concluded 1, answered 1
    (COUNT.format(steps="1", conclusion="1"), "1", True, True),
    # bars: heights A 4, B 1, C 6 -> the tallest is C (6 > 4 > 1); concluded C, answered C
    (BARS.format(steps="A 4, B 1, C 6", conclusion="C"), "C", True, True),
    # bars: the same heights concluding A (4 is not the tallest) and answering A -> the steps link fails
    (BARS.format(steps="A 4, B 1, C 6", conclusion="A"), "A", False, True),
    # bars: the right conclusion C, but the answer B -> the answer link fails
    (BARS.format(steps="A 4, B 1, C 6", conclusion="C"), "B", True, False),
    # bars: A 4 and C 4 tie for tallest, so the steps pick no single bar: concluding C does not follow
    (BARS.format(steps="A 4, B 1, C 4", conclusion="C"), "C", False, True),
    # bars: only two bars listed, "A 2, B 5" -> the steps do not cover the three bars asked about
    (BARS.format(steps="A 2, B 5", conclusion="B"), "B", False, True),
    # no steps at all: a bare conclusion is not supported by any reasoning
    ("So the answer is 3.", "3", False, True),
    # no conclusion: neither link can hold
    ("I count the red shapes: 1, 2, 3.", "3", False, False),
    (None, "3", False, False),
])
def test_oracle_reads_the_whole_chain(think, answer, steps, answer_link):
    assert stage1.oracle_parts(think, answer) == {"steps": steps, "answer": answer_link}
    assert stage1.oracle_consistent(think, answer) == (steps and answer_link)


def test_steps_imply():
    assert stage1.steps_imply(COUNT.format(steps="1, 2, 3, 4, 5, 6", conclusion="2")) == "6"  # six listed
    assert stage1.steps_imply(BARS.format(steps="A 2, B 5, C 3", conclusion="A")) == "B"  # 5 is the tallest
    assert stage1.steps_imply(COUNT.format(steps="1, 2, 2, 3", conclusion="3")) is None  # a repeat: no count
    assert stage1.steps_imply(BARS.format(steps="A 2, A 5, C 3", conclusion="A")) is None  # A twice, no B


def test_the_oracle_is_linear_on_hostile_text():
    """A policy's output is untrusted: a long run of digits or letters must not make the oracle quadratic."""
    import time

    hostile = "A 1, " * 20000 + "1, " * 20000 + "So the answer is 3."
    started = time.perf_counter()
    stage1.oracle_parts(hostile, "3")
    assert time.perf_counter() - started < 1.0  # 0.011 s measured (200,000 characters)
