"""Final answer of a generation or reference, and the one answer matcher (`answers_match`).

`answers_match(pred_text, truth)` is THE matching function: the RL answer reward (sail_dist/rl/rewards.py),
`sail-rl-filter`, `sail-rl-harvest`, `sail-eval` and the demo's evaluation (sail_dist/data/demo.py) all call it.

Final answer of a text (`final_answer`): the text is cut at `<|im_end|>`; with a closed `<think>...</think>` block
only what follows it counts (a `\\boxed{}` inside the thought is not the answer); an opened but never closed think
block has no answer (the reasoning did not finish); then the content of the LAST `\\boxed{...}` (nested braces
allowed), else the whole remaining text. The reference goes through the same extraction, so a reference may be
"42", "\\boxed{42}" or a full "<think>...</think>\\n\\n\\boxed{42}".

Matching (`match_answer`), first rule that applies:
  1. multiple choice, when `choices` are given or the reference is a single option letter ("B", "(B)", "b."):
     the prediction's letter from "(B)", "B", "b", "B.", "B) text", "Answer: B", "the answer is (B)", or its text
     equal to one option's text (needs `choices`) must be the reference's letter;
  2. numbers, when both sides parse as one: exact rational equality after normalisation (1.50 == 1.5,
     1/2 == 0.5 == \\frac{1}{2} == \\dfrac12, "1,000" == 1000, "3 cm" == 3, unicode minus, "x = 3" == 3);
  3. text: the normalised strings are equal (case, spacing, quotes, a final full stop, simple LaTeX).
Normalisation strips `$`, `\\text{}`/`\\mathrm{}`/`\\textbf{}`/`\\mbox{}`, `\\left`/`\\right`, thin spaces (`\\,` `\\!`
`\\;` `\\:` `~`), `\\%`/`%`, degrees (`^\\circ`, `^{\\circ}`, `°`) and a trailing unit from a fixed list (UNITS).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from sail_dist.data.template import extract_boxed, split_think

END_MARKERS = ("<|im_end|>", "<|endoftext|>")


# ------------------------------------------------------------------------------------------- extraction
def strip_end(text: str) -> str:
    """The generation up to its first end-of-turn marker (decoded completions keep the stop token)."""
    for m in END_MARKERS:
        text = text.split(m, 1)[0]
    return text


def final_answer(text: str) -> str | None:
    """The answer part of a generation or reference (see the module docstring); None when there is none."""
    text = strip_end(text)
    if "<think>" in text and "</think>" not in text:
        return None  # the thought never finished: whatever is boxed in it is not a final answer
    thought, rest = split_think(text)
    if thought is not None and "</think>" in rest:
        rest = rest[rest.rfind("</think>") + len("</think>"):]  # a second block: only text after the last close
    if "\\boxed" in rest:
        boxed = extract_boxed(rest)
        return boxed if boxed else None  # an empty or unclosed \boxed{} is no answer
    rest = rest.strip()
    return rest or None


# ------------------------------------------------------------------------------------------- normalisation
_LATEX_WRAPPERS = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textit|mbox|operatorname|textnormal)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*(\{[^{}]*\}|[0-9a-zA-Z])\s*(\{[^{}]*\}|[0-9a-zA-Z])")
_THIN_SPACES = re.compile(r"\\[,!;: ]|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\circ|\\degree")
_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")  # \left( but not \leftarrow
_MINUS = {"\u2212": "-", "\ufe63": "-", "\uff0d": "-"}
_ASSIGN = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?!=)")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
_UNITS_BASE = ("mm cm dm m km in inch inches ft feet foot yd yard yards mi mile miles meter meters metre metres "
               "centimeter centimeters centimetre centimetres millimeter millimeters kilometer kilometers kilometre "
               "kilometres mg g kg gram grams kilogram kilograms lb lbs pound pounds oz ounce ounces ton tons tonne "
               "tonnes ms s sec secs second seconds min mins minute minutes h hr hrs hour hours day days week weeks "
               "month months year years deg degree degrees rad radian radians ml mL l L liter liters litre litres "
               "gallon gallons dollar dollars cent cents yuan euro euros usd mph kmh km/h m/s cm/s kph n N j J "
               "w W v V a A hz Hz kw kW kwh kWh pa Pa kpa kPa unit units sq square cubic percent")
UNITS = frozenset(_UNITS_BASE.split())
MAX_NUMBER_CHARS = 200  # a longer string is not one number (and the regexes stay linear on long generations)
_UNIT_TAIL = re.compile(r"^(?P<num>.*?\d\.?)\s*(?P<unit>(?:(?:sq|square|cubic)\s+)?[a-zA-Z/]+)"
                        r"\s*(?:\^\s*\{?[23]\}?|[²³])?$")


def _unwrap(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _LATEX_WRAPPERS.sub(r"\1", s)
    return s


def normalize_text(s: str) -> str:
    """Canonical form of an answer string (see the module docstring): LaTeX decoration, spacing, case."""
    for a, b in _MINUS.items():
        s = s.replace(a, b)
    s = s.replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    s = _SIZING.sub("", s)
    s = _unwrap(s)
    s = _THIN_SPACES.sub("", s)
    s = s.replace("\\%", "%")
    s = _DEGREES.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.strip("\"'`").strip()
    s = re.sub(r"[.。]+$", "", s).strip()
    s = re.sub(r"\s*([^\w\s\\])\s*", r"\1", s)  # "( 1, 2 )" == "(1,2)"; words keep their spaces
    return s.lower()


def _strip_unit(s: str) -> str:
    m = _UNIT_TAIL.match(s)
    if m and (m.group("unit") in UNITS or m.group("unit").lower() in UNITS):
        return m.group("num").strip()
    return s


def _plain_number(s: str) -> Fraction | None:
    s = s.strip()
    if s.startswith("(") and s.endswith(")"):
        s = s[1:-1].strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if not _NUMBER.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(s: str) -> Fraction | None:
    """The exact value of a numeric answer (integer, decimal, fraction, percentage-free, unit-free), or None."""
    if len(s) > MAX_NUMBER_CHARS:
        return None
    s = normalize_text(s)
    s = _ASSIGN.sub("", s)
    s = s.replace(" ", "") if not re.search(r"[a-z]{2}", s) else s
    s = _FRAC.sub(lambda m: f"({m.group(1).strip('{}')})/({m.group(2).strip('{}')})", s)
    s = re.sub(r"%$|percent$", "", s).strip()
    s = _strip_unit(s).replace(" ", "")
    sign = 1
    while s[:1] in "+-" and s[1:2] in ("(", "{"):  # -(1)/(2), -\frac{1}{2}
        sign, s = (-sign if s[0] == "-" else sign), s[1:]
    parts = s.split("/")
    if len(parts) == 1:
        v = _plain_number(parts[0])
        return None if v is None else sign * v
    if len(parts) == 2:
        a, b = _plain_number(parts[0]), _plain_number(parts[1])
        if a is None or b is None or b == 0:
            return None
        return sign * a / b
    return None


# ------------------------------------------------------------------------------------------- multiple choice
_LETTER_ALONE = re.compile(r"^\(?\s*([a-z])\s*\)?\s*[.:)]?$")
_LETTER_LEAD = re.compile(r"^\(\s*([a-z])\s*\)\s*\S|^([a-z])\s*[.:)]\s*\S")
_LETTER_PHRASE = re.compile(r"(?:answer|option|choice)\s*(?:is|:|=)?\s*:?\s*\(?\s*([a-z])\s*\)?(?![a-z])")


def option_texts(choices) -> dict[str, str]:
    """{letter: normalised option text} from a list (A, B, ... in order) or a {letter: text} mapping."""
    if isinstance(choices, dict):
        items = [(str(k).strip().lower(), str(v)) for k, v in choices.items()]
    else:
        items = [(chr(ord("a") + i), str(v)) for i, v in enumerate(choices)]
    out = {}
    for letter, text in items:
        t = normalize_text(text)
        m = re.match(rf"^\(?{re.escape(letter)}\s*[.:)]\s*(.*)$", t)  # an option written "A. cat"
        out[letter] = m.group(1).strip() if m else t
    return out


def choice_letter(s: str, choices=None) -> str | None:
    """The option letter an answer names (lowercase), or None."""
    t = normalize_text(s)
    opts = option_texts(choices) if choices else None
    letter = None
    for rx in (_LETTER_ALONE, _LETTER_LEAD):
        m = rx.match(t)
        if m:
            letter = next(g for g in m.groups() if g)
            break
    if letter is None and opts:
        hits = [k for k, v in opts.items() if v and v == t]
        letter = hits[0] if len(hits) == 1 else None
    if letter is None:
        m = list(_LETTER_PHRASE.finditer(t))
        if m:
            letter = m[-1].group(1)
    if letter is not None and opts is not None and letter not in opts:
        return None
    return letter


# ------------------------------------------------------------------------------------------- matching
@dataclass
class Match:
    ok: bool
    how: str  # "choice" | "number" | "text" | "none" (no answer on one side)
    pred: str | None  # the extracted final answer of the prediction
    truth: str | None


def _is_letter_truth(truth: str) -> bool:
    return bool(_LETTER_ALONE.match(normalize_text(truth)))


def match_answer(pred_text: str, truth: str, choices=None) -> Match:
    """`answers_match` with the extracted answers and the rule that decided (for per-sample eval output)."""
    pred, ref = final_answer(pred_text), final_answer(truth)
    if pred is None or ref is None or not normalize_text(ref):
        return Match(False, "none", pred, ref)
    if choices or _is_letter_truth(ref):
        ref_letter = choice_letter(ref, choices)
        if ref_letter is not None:
            return Match(choice_letter(pred, choices) == ref_letter, "choice", pred, ref)
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return Match(a == b, "number", pred, ref)
    return Match(normalize_text(pred) == normalize_text(ref), "text", pred, ref)


def answers_match(pred_text: str, truth: str, choices=None) -> bool:
    """Whether a generation's final answer equals the reference (boxed extraction + normalisation + MC letters)."""
    return match_answer(pred_text, truth, choices).ok
