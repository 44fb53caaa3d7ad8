"""The numeric value of a short LaTeX answer, as MathVision's official equality computes it.

MATH-V's evaluation/utils.py (is_equal) turns each side into a number with latex2sympy2 and Python's eval
(the names of `math` in scope), rounded to 2 decimals. value() does exactly that when latex2sympy2 is
installed (optional: `pip install latex2sympy2==1.9.1 antlr4-python3-runtime==4.7.2`; imported only here,
only for MathVision); otherwise it uses read(), our own reader for the forms MathVision's answers take:

    numbers 2, -2.5, .5, 1,000 (a comma before exactly three digits groups thousands); + - * / and : (a
    ratio), \\cdot \\times \\div, implicit products (5\\sqrt{3}, 2\\pi, 2(3), "2 3"), ( ) { }, \\frac{a}{b}
    (\\dfrac, \\tfrac), \\sqrt{x}, \\sqrt[n]{x}, x^{y}, x^2, \\pi, 50\\% (= 1/2), n!, $...$, x=5 (read: 5)

Values combine as Python's eval combines what latex2sympy prints, so the type matches the official one (it
matters when is_equal compares tuples as text): 2.0 -> 2, \\frac{6}{2} -> 3.0, 2^{10} -> 1024, and 1/2\\pi
is 1/(2 pi). Anything else (a letter, \\text, a degree sign, a list, a value too large to hold) has no
value: None, which the official code also gives for letters and degree signs (its eval raises, and is_equal
says "not equal").
Example: read("5\\sqrt{3}") -> 8.660254037844387; read("\\frac{6}{2}") -> 3.0; read("2\\pi r") -> None.
"""
import contextlib
import io
import math
import re
from fractions import Fraction

MAX_BITS = 10_000  # 10^{10^{10}} would hang the official code (an exact integer with 10^10 digits)
MAX_LENGTH = 200  # longer answers are not numbers MathVision asks for; refusing them bounds the work

TOKEN_RE = re.compile(r"\s+|\d{1,3}(?:,\d{3})+(?![\d,])(?:\.\d*)?|\d+\.?\d*|\.\d+|\\[a-z]+|\\%|.")
COMMANDS = {"\\cdot": "*", "\\times": "*", "\\div": "/", ":": "/", "\\dfrac": "\\frac", "\\tfrac": "\\frac"}
IGNORED = ("$", "\\left", "\\right", "\\!", "\\,", "\\;", "\\ ")
ATOM_STARTS = ("(", "{", "\\pi", "\\frac", "\\sqrt")


class NoValue(Exception):
    """The text is not a number this reader knows."""


def tokens(text: str) -> list[str]:
    """Example: tokens("5\\sqrt{3}") -> ["5", "\\sqrt", "{", "3", "}"]; tokens("1,000 x") -> ["1000", "x"]."""
    for junk in IGNORED:
        text = text.replace(junk, " ")
    out = []
    for token in TOKEN_RE.findall(text):
        if not token.isspace():
            token = COMMANDS.get(token, token)
            out.append(token.replace(",", "") if token[0].isdigit() else token)
    return out


def number(exact: Fraction) -> int | float:
    """A rational as latex2sympy prints it and Python's eval then reads it: 2 -> 2 (int), 7/2 -> 3.5 (float).

    Example: number(Fraction("2.0")) -> 2; number(Fraction("3.50")) -> 3.5.
    """
    return exact.numerator if exact.denominator == 1 else exact.numerator / exact.denominator


class Reader:
    """A recursive-descent reader over tokens(). Values are Python ints and floats combined as Python's eval
    combines what latex2sympy prints: / always gives a float, + - * ** of ints give ints. An implicit product
    binds tighter than * and / (latex2sympy reads 1/2\\pi as 1/(2 pi)); ^ groups to the left."""

    def __init__(self, toks: list[str]):
        self.toks, self.at = toks, 0

    def peek(self) -> str | None:
        return self.toks[self.at] if self.at < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise NoValue(f"expected {expected or 'more'} at token {self.at}")
        self.at += 1
        return token

    def expression(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self):
        value = self.signed()
        while self.peek() in ("*", "/"):
            value = value * self.signed() if self.take() == "*" else divide(value, self.signed())
        return value

    def signed(self):
        if self.peek() in ("+", "-"):
            return self.signed() if self.take() == "+" else -self.signed()
        value = self.power()
        while self.peek() is not None and (self.peek()[0].isdigit() or self.peek() in ATOM_STARTS):
            value = value * self.power()  # an implicit product: 5\sqrt{3}, 2\pi, 2(3), "2 3"
        return value

    def power(self):
        value = self.postfix()
        while self.peek() == "^":
            self.take("^")
            token = self.peek()
            if token == "{":
                exponent = self.group()
            elif token is not None and token.isdigit() and len(token) == 1:  # x^10 is x^1 then 0 in LaTeX
                exponent = int(self.take())
            else:
                raise NoValue(f"unreadable exponent {token!r}")
            value = raise_to(value, exponent)
        return value

    def postfix(self):
        value = self.atom()
        while self.peek() in ("!", "\\%"):  # a bare % is not LaTeX: latex2sympy cannot read 60%
            if self.take() == "\\%":
                value = number(Fraction(value, 100)) if isinstance(value, int) else value / 100
            elif isinstance(value, int) and 0 <= value <= 100:
                value = math.factorial(value)
            else:
                raise NoValue("factorial of a non-integer or of more than 100")
        return value

    def group(self):
        self.take("{")
        value = self.expression()
        self.take("}")
        return value

    def atom(self):
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return number(Fraction(token))
        if token == "(":
            value = self.expression()
            self.take(")")
            return value
        if token == "{":
            self.at -= 1
            return self.group()
        if token == "\\pi":
            return math.pi
        if token == "\\frac":
            return divide(self.group(), self.group())
        if token == "\\sqrt":
            if self.peek() != "[":
                radicand = self.group()
                if radicand < 0:
                    raise NoValue("square root of a negative number")
                return math.sqrt(radicand)
            self.take("[")
            degree = self.expression()
            self.take("]")
            return raise_to(self.group(), divide(1, degree))
        raise NoValue(f"unknown token {token!r}")


def divide(a, b):
    if b == 0:
        raise NoValue("division by zero")  # the official eval raises ZeroDivisionError: not equal
    return a / b


def raise_to(base, exponent):
    """Python's base ** exponent, refused where it would be complex or too large to hold."""
    if base < 0 and not isinstance(exponent, int):
        raise NoValue("a fractional power of a negative number")  # complex: the official round() fails
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_BITS:
            raise NoValue("too large")
    try:
        return base ** exponent
    except (OverflowError, ZeroDivisionError):
        raise NoValue("too large, or zero to a negative power")


def read(text: str) -> int | float | None:
    """Our reader: the value of text, or None when it is not a number of the forms in the module docstring."""
    if len(text) > MAX_LENGTH or re.search(r"\s\\%", text):  # latex2sympy cannot read "6 \%" either
        return None
    if text.count("=") == 1:  # latex2sympy reads x=5 as its right side
        text = text.split("=")[1]
    toks = tokens(text)
    if not toks:
        return None
    reader = Reader(toks)
    try:
        value = reader.expression()
    except (NoValue, OverflowError, ValueError, TypeError, RecursionError):
        return None
    if reader.peek() is not None or isinstance(value, complex) or not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- the official path (optional)
try:  # MathVision only; the project works without it (read() stands in)
    from latex2sympy2 import latex2sympy
except ImportError:  # not installed (CI installs requirements.txt only)
    latex2sympy = None

SAFE_EVAL_RE = re.compile(r"[A-Za-z0-9*/+\-()., ]*")  # what sympy prints for a number: 5*sqrt(3), 3*pi/4
EVAL_NAMES = {name: getattr(math, name) for name in dir(math) if not name.startswith("_")}


def official_value(text: str):
    """eval(str(latex2sympy(text))) with math's names, as MATH-V's is_equal computes it; None where it raises.

    Guards the official code lacks (it would hang or run whatever the printer wrote): at most MAX_LENGTH
    characters, no exponent past MAX_EXPONENT digits' worth, and an eval of arithmetic text only.
    """
    nested_or_huge_power = re.search(r"\^\s*\{[^}]*\^|\^\s*\{?\s*-?\d{4,}", text)
    if latex2sympy is None or len(text) > MAX_LENGTH or nested_or_huge_power:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            printed = str(latex2sympy(text))
        if not SAFE_EVAL_RE.fullmatch(printed) or "__" in printed or "lambda" in printed:
            return None
        return eval(printed, {"__builtins__": {}}, dict(EVAL_NAMES))  # noqa: S307 (arithmetic text only)
    except Exception:  # the official code: any error means "no value" (is_equal returns False)
        return None


def value(text: str):
    """The number is_equal compares: latex2sympy2's when it is installed, else read()'s. None: no number."""
    return official_value(text) if latex2sympy is not None else read(text)
