"""adapters/latex_value.py: our reader of LaTeX numbers, and its agreement with latex2sympy2, the library
MathVision's official equality uses (MATH-V evaluation/utils.py is_equal: eval(str(latex2sympy(x))) to 2
decimals). The agreement test runs where latex2sympy2 is installed (it is optional; CI skips it):
pip install latex2sympy2==1.9.1 antlr4-python3-runtime==4.7.2."""
import math

import pytest

from adapters import latex_value as lv

# MATH-V data/testmini.jsonl: every free-form gold (an id with options [] ), in file order after the first six
TESTMINI_GOLDS = r"""
-2
4.8
2.5
(3,-4)
C
1680
6
61
6
2
10
7
11
3
140
9
10
3
3
95
5
19
12
9
10
4
5
6
2
8
3
16
5
6
12
9
3
248
75
711
8
4
25
3
20
16
446
13
9
1
5
5
64
3
3
22
3
6
2
2
12
70
500
1
60
24
7
4
5
6
32
4
20
3
5
21
6
3
4
16
6
6
10
4
9
4
3
4
3
2
4
2
4
10
6
4
2
5
5
7
3
4
3
3
36
160
20
80
120
8
45
54
""".strip().split("\n")
# MATH-V data/testmini.jsonl: option texts (the official code compares a reply with the gold option's too)
TESTMINI_OPTIONS = r"""
$\frac{6-\sqrt{2}}{2}$
$\frac{3 \sqrt{2}}{2}$
3
$6(\sqrt{2}-1)$
$540 \mathrm{~g}$
$90^{\circ}$
$\pi$
$1.5 \pi$
$2 \pi$
$3 \pi$
not enough data
$\frac{1}{3}$
$\frac{5}{4}$
$\frac{2}{9}$
$\frac{1}{2}$
$\frac{1}{4}$
$\frac{1}{24}$
$\frac{1}{16}$
$\frac{2}{13}$
$\sqrt{2}-1$
$\frac{\sqrt{2}}{4}$
$1-\frac{\sqrt{2}}{2}$
$(\sqrt{2}-1)^{2}$
7
$2 \sqrt{13}$
$4 \sqrt{3}$
$2 \cdot(\sqrt{2}+\sqrt{3})$
$8+2 \sqrt{2}$
$11-\sqrt{2}$
$8+3 \sqrt{2}$
$11+\frac{\sqrt{2}}{2}$
$140^{\circ}$
$(2 \cdot \sqrt{3}): 1$
$(2+\sqrt{3}): 1$
$(3+\sqrt{2}): 1$
$(3 \cdot \sqrt{2}): 1$
2:1
$a>0$
$b^{2}>4 a c$
$4 \pi$
$\frac{28}{3} \pi$
$8 \pi$
$\frac{14}{3} \pi$
$\frac{21}{2} \pi$
$\frac{2}{5}$
$\frac{1}{\sqrt{2}}$
$\frac{1}{\sqrt{5}}$
$720^{\circ}$
$\sqrt{6}$
$\frac{3 \sqrt{3}}{2}$
$2 \sqrt{2}$
$a$
$1: 1$
$3: 2$
$4: 3$
$7: 4$
$8: 5$
$30^{\circ}$
$66^{\circ}$
$70.5^{\circ}$
$50 \mathrm{~cm}^{2}$
$62.5 \mathrm{~cm}^{2}$
$2 \mathrm{~m}$
$1.5 \mathrm{~m}$
$\sqrt{a b}$
$\frac{1}{2} a^{2}$
$\frac{1}{4}\left(a^{2}+b^{2}\right)$
$\frac{\pi}{2}$
$6 \%$
$11 \%$
$y=b x+c$
$\frac{3}{8}$
$x$
$2 x$
$625 \uparrow 626 \uparrow 627$
$l$ and $m$
... only be 3.
$36 \mathrm{~cm}^{2}$
$5 \mathrm{~km}$
$380 \mathrm{~cm}$
$2 \mathrm{~cm}, 3 \mathrm{~cm}, 5 \mathrm{~cm}$
2h 48m
1 and 4
1,4 and 5
$\frac{1}{2}$ turn
$10$
$\frac{80}{11}$
$\frac{180}{19}$
$15$
$\frac{40}{3}$
$\frac{5}{9}$
$\frac{2}{3}$
$\frac{5}{6}$
$\sqrt{2}+1$
$\sqrt{3}-\sqrt{2}$
$\frac{\sqrt{2}}{2}$
$\frac{\sqrt{2}+1}{2}$
$3,5,4,2,1$
$3$
$\frac{3}{2}$
$4$
$5$
$\frac{5}{2}$
$1:2$
$1:3$
$\sqrt{3}:7$
$1:4$
$\sqrt{2}:6$
$\frac{1}{2}a+2b$
$\frac{3}{2}b+\frac{3}{4}a$
$2a-b$
$4b-\frac{1}{2}a$
$a+b$
$30^\circ$
$\text{none of these}$
$\frac{3\sqrt{2}}{4}$
$\frac{7\sqrt{6}}{16}$
$\frac{\sqrt{5}}{2}$
$\frac{2\sqrt{3}}{3}$
$\frac{\sqrt{6}}{2}$
$\text{january}$
$30\%$
1/4
1/2
3/4
5/4
$\textdollar 0.40$
$\frac{3}{4}$
$2$
$\frac{12}{5}$
a)
(a)
""".strip().split("\n")
# answers as a model writes them after the official clean-up; forms latex2sympy reads in its own way
ANSWER_FORMS = r"""
5\sqrt{3}
$5 \sqrt{3}$
8.66
\frac{\sqrt{3}}{2}
2\sqrt{13}
\frac{28}{3}\pi
(2+\sqrt{3}):1
0.5
\frac{1}{2}
8.660
3\pi
\pi/2
2^{10}
2^3
\sqrt[3]{8}
\sqrt[3]{2}
6(\sqrt{2}-1)
1.5\pi
-\frac{1}{2}
3!
10^{-2}
2.50
2.0
1,000
12,345
1,5
50\%
\dfrac{3}{4}
\frac{1}{2}\pi
1/2\pi
2/3\sqrt{3}
\frac{6}{2}
\sqrt{4}
\sqrt{8}
4^{1/2}
4^{\frac{1}{2}}
(-8)^{1/3}
-3^2
2^-1
2^{-1}
\frac{1}{0}
\pi r^2
e
\infty
nan
1e999
−11
-11
12cm
2\pi r
\sqrt{2}\sqrt{2}
(1+\sqrt{5})/2
\frac{1+\sqrt{5}}{2}
2 \times 3
6\div4
2\cdot 3
3.14
22/7
{5}
(5)
5.
.5
0
-0
+5
1 \frac{1}{2}
\frac12
\sqrt2
\left(\frac{1}{2}\right)
2(3)
(2)(3)
2\sqrt{2}+1
\sqrt{\frac{1}{4}}
\frac{3}{4}\pi
2 3
3.50
\frac{4}{2}
0.5+0.5
100\%
6 \%
6\%
2\pi/3
1/2/2
2*3\pi
-2\pi
2-\pi
(2)\pi
\pi(2)
\sqrt{2}^{2}
2^{3}^{2}
2^3^2
8^{1/3}
\sqrt[3]{-8}
2^2+3^2
(\frac{6}{2},1)
[2,3]
""".strip().split("\n")


@pytest.mark.parametrize("text, value", [
    ("5\\sqrt{3}", 5 * math.sqrt(3)), ("$5 \\sqrt{3}$", 5 * math.sqrt(3)), ("\\frac{6}{2}", 3.0),
    ("2.0", 2), ("3.50", 3.5), ("1,000", 1000), ("2 3", 6), ("2:1", 2.0), ("6\\%", 0.06), ("3!", 6),
    ("1/2\\pi", 1 / (2 * math.pi)),  # an implicit product binds tighter than /, as latex2sympy reads it
    ("\\frac{3}{4}\\pi", 3 * math.pi / 4), ("\\sqrt[3]{8}", 2.0), ("2^{3}^{2}", 64), ("10^{-2}", 0.01),
    ("x=5", 5), ("-3^2", -9),
])
def test_read_hand_computed(text, value):
    got = lv.read(text)
    assert got == pytest.approx(value) and type(got) is type(value)  # int vs float as the official eval


@pytest.mark.parametrize("text", ["2\\pi r", "e", "\\infty", "nan", "1e999", "12cm", "30^\\circ", "60%",
                                  "6 \\%", "\\text{5}", "[1,2]", "1,5", "\\frac{1}{0}", "(-8)^{1/3}",
                                  "10^{10^{10}}", "2^{99999}", "{" * 5000, "\\sqrt{" * 100, "−11", ""])
def test_read_gives_no_value_where_the_official_eval_fails(text):
    assert lv.read(text) is None  # letters, units, degrees, lists: latex2sympy's eval raises; huge: refused


def test_read_agrees_with_latex2sympy_on_the_testmini_golds_options_and_answer_forms():
    """Every text, as written and lower-cased (is_equal lower-cases both sides): the same value to 2 decimals,
    of the same type (an int or a float), or no value on both sides."""
    pytest.importorskip("latex2sympy2")
    assert lv.latex2sympy is not None

    def rounded(v):
        return round(v, 2) if isinstance(v, (int, float)) else None

    texts = [t for t in TESTMINI_GOLDS + TESTMINI_OPTIONS + ANSWER_FORMS for t in (t, t.lower())]
    differ = [(t, lv.official_value(t), lv.read(t)) for t in texts
              if (rounded(lv.official_value(t)), type(rounded(lv.official_value(t))))
              != (rounded(lv.read(t)), type(rounded(lv.read(t))))]
    assert len(texts) == 2 * (len(TESTMINI_GOLDS) + len(TESTMINI_OPTIONS) + len(ANSWER_FORMS)) and not differ
