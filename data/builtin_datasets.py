"""Built-in offline datasets, addressed as `builtin:<name>?<options>`.

- `pydoc`: instruction pairs made from real text that ships with Python (standard-library
  docstrings and the `pydoc_data` topics), for training and demos without the Hub.
- `numpydoc`: instruction pairs made from the docstrings that ship with the installed numpy, a
  second real corpus (scientific-API prose rather than the standard library's), for the study.
- `facts`: synthetic random facts whose information content is known exactly
  (n_facts · log2(choices) bits), for capacity experiments (DESIGN.md).
- `arithmetic`: every sum a + b up to `max_operand`, as RL prompts with answers (`prompt`,
  `answer`) for a verifiable reward (docs/RL.md); not a supervised set.

Only the standard library is used (numpydoc imports numpy in a subprocess), so loading a built-in
needs neither `datasets` nor network.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from data.errors import UserError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinSpec:
    """A parsed `builtin:<name>?<options>` reference (options already validated as ints)."""

    name: str
    options: dict


# ---------------------------------------------------------------------------------------------
# pydoc: standard-library docstrings and pydoc_data topics
# ---------------------------------------------------------------------------------------------

# Well-documented, side-effect-free standard-library modules. A fixed sorted list (not
# `sys.stdlib_module_names`) so the data set does not change with what happens to be imported.
# The text itself still depends on the Python version: 3.11 on the CPU dev machines, 3.12 on the
# GPU machine, so fingerprints of builtin:pydoc differ between them.
PYDOC_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions", "functools",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools",
    "json", "logging", "math", "operator", "os", "os.path", "pathlib", "pickle", "pprint",
    "random", "re", "secrets", "shlex", "shutil", "statistics", "string", "struct", "tempfile",
    "textwrap", "threading", "time", "timeit", "typing", "unittest", "urllib.parse", "uuid",
    "zipfile", "zlib",
)  # fmt: skip
PYDOC_MIN_ANSWER_CHARS = 40  # shorter docstrings ("Return self.") teach nothing
PYDOC_MAX_DOCSTRING_CHARS = 1200
PYDOC_MAX_TOPIC_CHARS = 2500
_PYDOC_SHUFFLE_SEED = 0  # fixed: `limit` then keeps a mix of docstrings and topics


def _truncate_paragraphs(text: str, max_chars: int) -> str:
    """Whole paragraphs from the start of `text`, as many as fit in `max_chars`.

    The first paragraph is always kept (cut at a line boundary if it alone is too long), so the
    answer never ends mid-sentence unless a single line exceeds the limit.
    """
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    kept: list[str] = []
    for paragraph in paragraphs:
        candidate = "\n\n".join([*kept, paragraph])
        if len(candidate) > max_chars:
            break
        kept.append(paragraph)
    if kept:
        return "\n\n".join(kept)
    if not paragraphs:
        return ""
    lines, out = paragraphs[0].split("\n"), ""
    for line in lines:
        if out and len(out) + 1 + len(line) > max_chars:
            break
        out = f"{out}\n{line}" if out else line
    return out[:max_chars]


def _docstring_answer(obj, qualified: str) -> str:
    """The useful part of `obj`'s own docstring: cleaned, without a leading signature line."""
    doc = obj.__doc__  # not inspect.getdoc: it would copy a base class's docstring
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    first, _, rest = doc.partition("\n")
    short_name = qualified.rsplit(".", 1)[-1]
    if first.startswith(short_name + "(") and first.rstrip().endswith(")"):
        doc = rest.strip()  # C functions without __text_signature__ repeat their signature
    return _truncate_paragraphs(doc, PYDOC_MAX_DOCSTRING_CHARS)


def _public_members(module_name: str):
    """(qualified name, object) for the functions and classes a module defines, sorted by name."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # Skip re-exports (os re-exports posixpath functions, typing re-exports collections.abc):
        # `os.path` is the module posixpath/ntpath, hence the comparison with module.__name__.
        if getattr(obj, "__module__", None) not in (module_name, module.__name__):
            continue
        yield f"{module_name}.{name}", obj


def _topic_answer(text: str) -> str:
    """A pydoc topic without its reST underline, cut at a paragraph boundary."""
    lines = [line for line in text.strip().split("\n") if not (line and set(line) <= set("*=-~^"))]
    return _truncate_paragraphs("\n".join(lines), PYDOC_MAX_TOPIC_CHARS)


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _build_pydoc_rows() -> list[dict]:
    """All pydoc pairs; call it in a clean interpreter (see `_pydoc_all`)."""
    from pydoc_data.topics import topics

    rows, seen_answers = [], set()
    for module_name in PYDOC_MODULES:
        for qualified, obj in _public_members(module_name):
            answer = _docstring_answer(obj, qualified)
            if len(answer) < PYDOC_MIN_ANSWER_CHARS or answer in seen_answers:
                continue  # aliases share a docstring: keep the first name only
            seen_answers.add(answer)
            question = (
                f"What is the Python class `{qualified}` for?"
                if inspect.isclass(obj)
                else f"What does `{qualified}` do?"
            )
            rows.append(_chat(question, answer))
    for topic in sorted(topics):
        answer = _topic_answer(topics[topic])
        if len(answer) >= PYDOC_MIN_ANSWER_CHARS:
            rows.append(_chat(f"Explain the Python topic '{topic}'.", answer))
    random.Random(_PYDOC_SHUFFLE_SEED).shuffle(rows)
    return rows


def _build_in_clean_interpreter(builder: str, extra_paths: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The rows `builder()` (a function of this module) returns in a fresh `python -S -E` subprocess.

    Libraries patch the standard library when imported (torch replaces `inspect.getfile`), which
    would change the rows, and so the dataset fingerprint, with what the caller imported
    before. A clean interpreter without site-packages sees only the standard library, plus the
    folders in `extra_paths` (where numpy is installed, for numpydoc).
    """
    paths = (str(Path(__file__).resolve().parent.parent), *extra_paths)
    code = (
        f"import json, sys; sys.path[:0] = {list(paths)!r}; "
        f"from data.builtin_datasets import {builder}; "
        f"json.dump({builder}(), sys.stdout)"
    )
    out = subprocess.run([sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout))


@functools.lru_cache(maxsize=1)
def _pydoc_all() -> tuple[dict, ...]:
    return _build_in_clean_interpreter("_build_pydoc_rows")


def pydoc_rows(limit: int | None = None) -> list[dict]:
    """Chat pairs from standard-library docstrings and `pydoc_data.topics`.

    Deterministic for a given Python version (sorted modules and names, then a fixed-seed
    shuffle so that `limit` keeps a mix of both kinds). Answers shorter than
    `PYDOC_MIN_ANSWER_CHARS` and repeated answers (aliases) are dropped.

    Args:
        limit: keep only the first `limit` pairs (None: all of them).
    """
    return _first_rows("pydoc", _pydoc_all, limit)


def _copy_row(row: dict) -> dict:
    # The cache holds the master copy; callers get their own dicts to mutate.
    return {"messages": [dict(m) for m in row["messages"]]}


# ---------------------------------------------------------------------------------------------
# numpydoc: the docstrings that ship with numpy
# ---------------------------------------------------------------------------------------------

# numpy's documented public namespaces, fixed and sorted so the data set does not change with
# what else is installed. The text depends on the numpy version (requirements/constraints.txt).
NUMPYDOC_MODULES = ("numpy", "numpy.fft", "numpy.linalg", "numpy.random", "numpy.strings")
# A numpydoc section header: a title line underlined with dashes ("Parameters\n----------").
_NUMPYDOC_SECTION = re.compile(r"^[A-Z][A-Za-z ]*\n-{3,}$", re.MULTILINE)
# ufuncs and C functions start with their signature: "add(x1, x2, /, out=None, ...)".
_SIGNATURE_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\(.*\)(\s*->.*)?$")


def _numpydoc_answer(doc: str) -> str:
    """The summary and extended summary of a numpy docstring: everything before its first
    section (Parameters, Returns, See Also, Examples, ...), without a leading signature line."""
    doc = inspect.cleandoc(doc)
    first, _, rest = doc.partition("\n")
    if _SIGNATURE_LINE.match(first.strip()):
        doc = rest.strip()
    section = _NUMPYDOC_SECTION.search(doc)
    if section:
        doc = doc[: section.start()]
    return _truncate_paragraphs(doc.strip(), PYDOC_MAX_DOCSTRING_CHARS)


def _build_numpydoc_rows() -> list[dict]:
    """All numpydoc pairs; call it in a clean interpreter (see `_numpydoc_all`)."""
    rows, seen_answers = [], set()
    for module_name in NUMPYDOC_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or callable(obj)) or not isinstance(getattr(obj, "__doc__", None), str):
                continue
            answer = _numpydoc_answer(obj.__doc__)
            if len(answer) < PYDOC_MIN_ANSWER_CHARS or answer in seen_answers:
                continue  # aliases (numpy.random.random_sample, ...) share a docstring: keep the first
            seen_answers.add(answer)
            qualified = f"{module_name}.{name}"
            question = (
                f"What is the numpy class `{qualified}` for?"
                if inspect.isclass(obj) and not hasattr(obj, "nin")  # ufuncs are instances, not classes
                else f"What does `{qualified}` do?"
            )
            rows.append(_chat(question, answer))
    random.Random(_PYDOC_SHUFFLE_SEED).shuffle(rows)
    return rows


@functools.lru_cache(maxsize=1)
def _numpydoc_all() -> tuple[dict, ...]:
    spec = importlib.util.find_spec("numpy")
    if spec is None or spec.origin is None:
        raise UserError("builtin:numpydoc is made from numpy's docstrings, but numpy is not installed: "
                        "`pip install numpy`, or use builtin:pydoc.")
    return _build_in_clean_interpreter("_build_numpydoc_rows", (str(Path(spec.origin).parent.parent),))


def numpydoc_rows(limit: int | None = None) -> list[dict]:
    """Chat pairs from the docstrings of numpy's public functions and classes.

    "What does `numpy.argsort` do?" → the docstring's summary and extended summary (the text before
    its Parameters section, whole paragraphs up to `PYDOC_MAX_DOCSTRING_CHARS`). Deterministic for
    a given numpy version (sorted namespaces and names, then a fixed-seed shuffle). Answers shorter
    than `PYDOC_MIN_ANSWER_CHARS` and repeated answers (aliases) are dropped.

    Args:
        limit: keep only the first `limit` pairs (None: all of them).
    """
    return _first_rows("numpydoc", _numpydoc_all, limit)


def _first_rows(name: str, all_rows, limit: int | None) -> list[dict]:
    """Copies of the first `limit` of a built-in's cached rows (`all_rows()`; all of them for None),
    the limit checked before the rows are built."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"builtin:{name} needs limit >= 1 (or no limit), got {limit!r}.")
    rows = all_rows()
    return [_copy_row(r) for r in (rows if limit is None else rows[:limit])]


# ---------------------------------------------------------------------------------------------
# facts: random facts with an exactly known information content
# ---------------------------------------------------------------------------------------------

# Each attribute has a pool of 32 values; `choices` = k uses the first k of each pool.
FACT_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("favourite colour", (
        "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
        "grey", "teal", "navy", "maroon", "olive", "lime", "cyan", "magenta", "gold", "silver",
        "beige", "ivory", "coral", "salmon", "crimson", "indigo", "violet", "turquoise", "amber",
        "lavender", "mint", "ochre",
    )),
    ("home city", (
        "Paris", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Berlin", "Madrid", "Vienna",
        "Prague", "Dublin", "Lisbon", "Athens", "Warsaw", "Helsinki", "Seoul", "Bangkok",
        "Nairobi", "Accra", "Quito", "Bogota", "Santiago", "Havana", "Manila", "Hanoi", "Delhi",
        "Dhaka", "Tehran", "Ankara", "Sydney", "Toronto",
    )),
    ("pet animal", (
        "cat", "dog", "parrot", "rabbit", "hamster", "goldfish", "turtle", "ferret", "horse",
        "goat", "snake", "lizard", "frog", "owl", "duck", "pony", "llama", "alpaca", "hedgehog",
        "canary", "pigeon", "mouse", "rat", "gecko", "iguana", "tortoise", "chinchilla", "pig",
        "sheep", "cow", "donkey", "crab",
    )),
    ("favourite fruit", (
        "apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "orange", "peach", "pear",
        "plum", "kiwi", "lime", "papaya", "guava", "fig", "date", "apricot", "coconut", "lychee",
        "pineapple", "raspberry", "strawberry", "blueberry", "blackberry", "cranberry",
        "grapefruit", "pomegranate", "quince", "tangerine", "durian", "persimmon",
    )),
)  # fmt: skip
FACTS_MAX_CHOICES = min(len(pool) for _, pool in FACT_ATTRIBUTES)

# Invented names: onset + vowel + coda, two syllables, capitalised ("Zorblat"). Invented so the
# base model cannot already know a fact about them.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "x")


@functools.lru_cache(maxsize=1)
def _entity_names() -> tuple[str, ...]:
    """Every distinct two-syllable name, sorted (different splits can spell the same name)."""
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    return tuple(sorted({(a + b).capitalize() for a in syllables for b in syllables}))


def facts_max_facts() -> int:
    """How many facts `facts_rows` can make: distinct names × attributes."""
    return len(_entity_names()) * len(FACT_ATTRIBUTES)


def _validate_facts(n_facts: int, choices: int) -> None:
    if not isinstance(choices, int) or not 2 <= choices <= FACTS_MAX_CHOICES:
        raise UserError(
            f"builtin:facts needs 2 <= choices <= {FACTS_MAX_CHOICES} (each attribute has "
            f"{FACTS_MAX_CHOICES} possible values), got {choices!r}."
        )
    if not isinstance(n_facts, int) or not 1 <= n_facts <= facts_max_facts():
        raise UserError(
            f"builtin:facts needs 1 <= n_facts <= {facts_max_facts()} ({len(_entity_names())} "
            f"distinct invented names × {len(FACT_ATTRIBUTES)} attributes), got {n_facts!r}."
        )


def facts_information_bits(n_facts: int, choices: int) -> float:
    """Exact information content of `facts_rows(n_facts, choices, seed)`: n_facts·log2(choices).

    Each answer's value is an independent uniform draw from `choices` options, so the answers
    have entropy log2(choices) bits each and n_facts·log2(choices) bits together. Everything else
    in an answer ("The favourite colour of Zorblat is ...") is a deterministic function of the
    question, and which (entity, attribute) pairs are asked is fixed by the seed and visible in
    the prompt, so the question text carries no information the model must store.
    """
    _validate_facts(n_facts, choices)
    return n_facts * math.log2(choices)


def facts_rows(n_facts: int = 1000, choices: int = 16, seed: int = 0) -> list[dict]:
    """`n_facts` chat pairs, each about a distinct (entity, attribute) pair.

    Example: user "What is the favourite colour of Zorblat?" → assistant "The favourite colour
    of Zorblat is teal." Entities are sampled without replacement from invented names; each
    entity gets every attribute in turn, so ceil(n_facts / attributes) entities are used.
    Values are drawn uniformly from the first `choices` values of the attribute's pool.
    Deterministic in (n_facts, choices, seed).
    """
    _validate_facts(n_facts, choices)
    rng = random.Random(seed)
    n_entities = -(-n_facts // len(FACT_ATTRIBUTES))
    entities = rng.sample(_entity_names(), n_entities)
    rows = []
    for i in range(n_facts):
        entity = entities[i // len(FACT_ATTRIBUTES)]
        attribute, pool = FACT_ATTRIBUTES[i % len(FACT_ATTRIBUTES)]
        value = pool[rng.randrange(choices)]
        rows.append(
            _chat(f"What is the {attribute} of {entity}?", f"The {attribute} of {entity} is {value}.")
        )
    return rows


# ---------------------------------------------------------------------------------------------
# arithmetic: sums with a verifiable answer, for RL
# ---------------------------------------------------------------------------------------------

# The prompt: a short system line, one worked example and the question. Without the example
# SmolLM2-135M-Instruct answers in a sentence ("The answer is ...") or repeats the question, and
# a short answer with an exact-match reward is never earned (docs/RL.md, "The built-in task").
ARITHMETIC_SYSTEM = "Answer with a number."
ARITHMETIC_EXAMPLE = ("2 + 3", "5")
ARITHMETIC_MAX_OPERAND = 999


def arithmetic_rows(max_operand: int = 9, seed: int = 0) -> list[dict]:
    """Every sum a + b with 0 <= a, b <= max_operand, in a seeded order, as RL rows.

    A row is {"prompt": [system, worked example, question] chat messages, "answer": "<a + b>"}:
    scored with the `exact` reward. (max_operand + 1)² rows; the worked example's own sum is left out.

    Raises:
        UserError: max_operand outside 1..999.
    """
    if not 1 <= max_operand <= ARITHMETIC_MAX_OPERAND:
        raise UserError(f"builtin:arithmetic needs 1 <= max_operand <= {ARITHMETIC_MAX_OPERAND}, got {max_operand}.")
    example_q, example_a = ARITHMETIC_EXAMPLE
    rows = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            question = f"{a} + {b}"
            if question == example_q:
                continue
            prompt = [{"role": "system", "content": ARITHMETIC_SYSTEM},
                      {"role": "user", "content": example_q}, {"role": "assistant", "content": example_a},
                      {"role": "user", "content": question}]
            rows.append({"prompt": prompt, "answer": str(a + b)})
    random.Random(seed).shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# builtin:<name>?<options>
# ---------------------------------------------------------------------------------------------

# name -> (row builder, {option: default}); options are non-negative integers.
BUILTINS: dict[str, tuple[Callable[..., list[dict]], dict]] = {
    "arithmetic": (arithmetic_rows, {"max_operand": 9, "seed": 0}),
    "facts": (facts_rows, {"n_facts": 1000, "choices": 16, "seed": 0}),
    "pydoc": (pydoc_rows, {"limit": None}),
    "numpydoc": (numpydoc_rows, {"limit": None}),
}


def is_builtin(source: str) -> bool:
    return source.startswith(BUILTIN_PREFIX)


def parse_builtin(source: str) -> BuiltinSpec:
    """Parse `builtin:facts?n_facts=2000&choices=16&seed=0` into a name and int options.

    Raises:
        UserError: unknown built-in, unknown or repeated option, or a value that is not a
            non-negative integer; the message lists what is valid.
    """
    parts = urlsplit(source[len(BUILTIN_PREFIX) :] if is_builtin(source) else source)
    name = parts.path
    if name not in BUILTINS:
        raise UserError(
            f"Unknown built-in dataset {source!r}: valid ones are "
            f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))}."
        )
    defaults = BUILTINS[name][1]
    options = dict(defaults)
    given: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in defaults:
            raise UserError(
                f"Unknown option {key!r} for builtin:{name}: valid options are "
                f"{', '.join(f'{k} (default {v})' for k, v in defaults.items())}."
            )
        if key in given:
            raise UserError(f"Option {key!r} is given twice in {source!r}: give it once.")
        if not value.isdigit():
            raise UserError(f"Option {key}={value!r} in {source!r} must be a non-negative integer.")
        given.add(key)
        options[key] = int(value)
    return BuiltinSpec(name=name, options=options)


def load_builtin(source: str) -> list[dict]:
    """The rows of a built-in dataset reference (see `parse_builtin`)."""
    spec = parse_builtin(source)
    builder = BUILTINS[spec.name][0]
    return builder(**spec.options)
