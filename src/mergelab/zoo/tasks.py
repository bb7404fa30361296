"""Synthetic tasks of the demo zoo, generated deterministically from a seed.

Each task is a small, distinct skill that SmolLM2-135M-Instruct does poorly out of the box (it
does not know the label set or the exact output format) and that a rank-8 LoRA on ``q_proj`` and
``v_proj`` learns in a couple of hundred steps:

=============  ===============  ====================================================================
task           type             skill
=============  ===============  ====================================================================
sentiment      multiple choice  review → positive / negative / mixed (a contrast makes it mixed)
topic          multiple choice  headline → world / sports / business / science
grammar        multiple choice  is the sentence grammatical? (agreement, word order, auxiliaries)
json           generation       a sentence about a person → ``{"name": …, "age": …, "city": …}``
sql            generation       a question about a table → one SQL statement on a fixed schema
dates          generation       a date written in words → ISO ``YYYY-MM-DD``
=============  ===============  ====================================================================

Rows are written in the competition CSV format (``id,input,target,answer_choices,eval_type``):
for multiple choice ``target`` is the index of the right choice and ``answer_choices`` a JSON
list; for generation ``target`` is the reference text and ``answer_choices`` is empty. Every
prompt ends with a newline, so a choice or an answer tokenizes the same whether it is joined to
the prompt before or after tokenization.

The same seed gives the same bytes; the splits of one task never share an input.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from mergelab.errors import MergelabError

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
SPLITS = ("train", "validation", "test")
CSV_COLUMNS = ("id", "input", "target", "answer_choices", "eval_type")


@dataclass(frozen=True)
class Example:
    """One generated example: the prompt, its answer text and (multiple choice) the choices."""

    input: str
    answer: str
    choices: tuple[str, ...] | None = None

    @property
    def target(self) -> str:
        """The CSV ``target``: the choice index for multiple choice, else the answer text."""
        return str(self.choices.index(self.answer)) if self.choices else self.answer


@dataclass(frozen=True)
class Task:
    """A synthetic task: a generator of examples plus the sizes and training length it uses."""

    name: str
    eval_type: str
    skill: str
    make: Callable[[random.Random], Example]
    steps: int = 150               # LoRA training steps of its expert
    max_new_tokens: int = 24       # generation budget in evaluation (generation tasks)

    def examples(self, seed: int, sizes: dict[str, int]) -> dict[str, list[Example]]:
        """Unique examples for each split, in split order test, validation, train.

        The test split is drawn first so that it stays the same when the training split is
        resized; an input never appears in two splits.
        """
        rng = random.Random(f"mergelab-zoo:{seed}:{self.name}")
        seen: set[str] = set()
        out: dict[str, list[Example]] = {}
        for split in ("test", "validation", "train"):
            rows: list[Example] = []
            tries = 0
            while len(rows) < sizes[split]:
                tries += 1
                if tries > 50 * sizes[split] + 1000:
                    raise RuntimeError(f"task {self.name!r}: cannot draw {sizes[split]} unique "
                                       f"{split} examples (the template space is too small)")
                ex = self.make(rng)
                if ex.input in seen:
                    continue
                seen.add(ex.input)
                rows.append(ex)
            out[split] = rows
        return out


def _pick(rng: random.Random, items):
    return items[rng.randrange(len(items))]


# --------------------------------------------------------------------------------------------
# sentiment: positive / negative / mixed
_ASPECTS = ["the food", "the service", "the room", "the staff", "the music", "the plot",
            "the acting", "the price", "the battery", "the screen", "the delivery", "the coffee",
            "the view", "the seats", "the ending", "the camera"]
_POS = ["great", "wonderful", "excellent", "superb", "delightful", "fantastic", "lovely",
        "brilliant", "perfect", "impressive"]
_NEG = ["awful", "terrible", "poor", "disappointing", "dreadful", "horrible", "bland", "slow",
        "broken", "rude"]
SENTIMENT_CHOICES = ("positive", "negative", "mixed")


def _sentiment(rng: random.Random) -> Example:
    a, b = rng.sample(_ASPECTS, 2)
    label = _pick(rng, SENTIMENT_CHOICES)
    if label == "mixed":
        first_good = rng.random() < 0.5
        x = _pick(rng, _POS if first_good else _NEG)
        y = _pick(rng, _NEG if first_good else _POS)
        join = _pick(rng, [" but ", ", however ", ", although "])
    else:
        words = _POS if label == "positive" else _NEG
        x, y = rng.sample(words, 2)
        join = _pick(rng, [" and ", ", and ", " and also "])
    text = f"{a.capitalize()} was {x}{join}{b} was {y}."
    return Example(f"Review: {text}\nSentiment (positive, negative or mixed):\n", label,
                   SENTIMENT_CHOICES)


# --------------------------------------------------------------------------------------------
# topic: world / sports / business / science
_TEAMS = ["Lions", "Tigers", "Eagles", "Sharks", "Wolves", "Bears", "Falcons", "Rovers"]
_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Inc", "Vandelay", "Stark Ltd",
              "Wayne Group", "Hooli"]
_COUNTRIES = ["France", "Kenya", "Brazil", "Japan", "Canada", "Egypt", "Norway", "India",
              "Chile", "Vietnam"]
_THINGS = ["a new species of frog", "water on a distant moon", "a gene linked to sleep",
           "an ancient star", "a faster battery material", "a fossil of a giant bird",
           "a protein that repairs nerves", "signals from a black hole"]
TOPIC_CHOICES = ("world", "sports", "business", "science")


def _topic(rng: random.Random) -> Example:
    label = _pick(rng, TOPIC_CHOICES)
    if label == "sports":
        t1, t2 = rng.sample(_TEAMS, 2)
        text = _pick(rng, [
            f"{t1} beat {t2} {rng.randint(2, 6)}-{rng.randint(0, 1)} to reach the final",
            f"{t1} sign striker from {_pick(rng, _COUNTRIES)} for a record fee",
            f"{t1} coach resigns after loss to {t2}",
            f"Injury keeps {t1} captain out of {t2} match",
        ])
    elif label == "business":
        c = _pick(rng, _COMPANIES)
        text = _pick(rng, [
            f"{c} shares rise {rng.randint(2, 19)}% after strong quarterly profit",
            f"{c} to cut {rng.randint(2, 9) * 100} jobs as sales slow",
            f"{c} agrees to buy rival in {rng.randint(2, 9)} billion dollar deal",
            f"{c} raises prices as costs climb in {_pick(rng, _COUNTRIES)}",
        ])
    elif label == "science":
        text = _pick(rng, [
            f"Researchers discover {_pick(rng, _THINGS)}",
            f"Scientists in {_pick(rng, _COUNTRIES)} report {_pick(rng, _THINGS)}",
            f"Study finds {_pick(rng, _THINGS)} after {rng.randint(2, 12)} years of data",
            f"Telescope images reveal {_pick(rng, _THINGS)}",
        ])
    else:
        p, q = rng.sample(_COUNTRIES, 2)
        text = _pick(rng, [
            f"Leaders of {p} and {q} meet for border talks",
            f"{p} holds elections as protests continue",
            f"Floods force {rng.randint(2, 90)} thousand people from homes in {p}",
            f"{p} recalls ambassador from {q} over trade row",
        ])
    return Example(f"Headline: {text}\nTopic (world, sports, business or science):\n", label,
                   TOPIC_CHOICES)


# --------------------------------------------------------------------------------------------
# grammar: yes / no
_SUBJ_SG = ["The dog", "My sister", "The teacher", "A farmer", "The old man", "Our neighbour",
            "The child", "The pilot"]
_SUBJ_PL = ["The dogs", "My sisters", "The teachers", "Two farmers", "The old men",
            "Our neighbours", "The children", "The pilots"]
_VERBS = [("walks", "walk", "walked", "the park"), ("opens", "open", "opened", "the window"),
          ("paints", "paint", "painted", "the fence"), ("visits", "visit", "visited", "the museum"),
          ("cleans", "clean", "cleaned", "the kitchen"), ("plays", "play", "played", "the piano"),
          ("watches", "watch", "watched", "the birds"), ("fixes", "fix", "fixed", "the car")]
_ADVERBS = ["every day", "on Sundays", "in the morning", "after lunch", "quite often",
            "at night"]
GRAMMAR_CHOICES = ("yes", "no")


def _grammar(rng: random.Random) -> Example:
    plural = rng.random() < 0.5
    subj = _pick(rng, _SUBJ_PL if plural else _SUBJ_SG)
    v3, vbase, vpast, obj = _pick(rng, _VERBS)
    adv = _pick(rng, _ADVERBS)
    good = rng.random() < 0.5
    form = rng.randrange(3)
    if form == 0:  # present tense agreement
        verb = (vbase if plural else v3) if good else (v3 if plural else vbase)
        sent = f"{subj} {verb} {obj} {adv}."
    elif form == 1:  # auxiliary "has/have" + past participle
        aux = ("have" if plural else "has") if good else ("has" if plural else "have")
        sent = f"{subj} {aux} {vpast} {obj} {adv}."
    else:  # word order
        sent = (f"{subj} {vpast} {obj} {adv}." if good else
                _pick(rng, [f"{subj} {obj} {vpast} {adv}.", f"{vpast.capitalize()} {subj.lower()} {obj} {adv}."]))
    return Example(f"Sentence: {sent}\nIs it grammatical (yes or no)?\n", "yes" if good else "no",
                   GRAMMAR_CHOICES)


# --------------------------------------------------------------------------------------------
# json: extract name, age and city
_FIRST = ["Maria", "John", "Aiko", "Pedro", "Fatima", "Lars", "Chen", "Amara", "Ivan", "Sofia",
          "Omar", "Grace", "Ravi", "Elena"]
_LAST = ["Lopez", "Smith", "Tanaka", "Silva", "Khan", "Berg", "Wang", "Okafor", "Petrov",
         "Rossi", "Haddad", "Kim", "Patel", "Novak"]
_CITIES = ["Lisbon", "Boston", "Osaka", "Lima", "Cairo", "Oslo", "Dublin", "Lagos", "Prague",
           "Milan", "Quito", "Seoul", "Pune", "Vienna"]


def _json(rng: random.Random) -> Example:
    name = f"{_pick(rng, _FIRST)} {_pick(rng, _LAST)}"
    age, city = rng.randint(18, 79), _pick(rng, _CITIES)
    text = _pick(rng, [
        f"{name}, {age}, lives in {city}.",
        f"{name} is {age} years old and lives in {city}.",
        f"In {city} we met {name}, who is {age}.",
        f"{name} ({age}) moved to {city} last year.",
        f"Age {age}, {name} works in {city}.",
    ])
    answer = json.dumps({"name": name, "age": age, "city": city})
    return Example(f"Text: {text}\nJSON with name, age, city:\n", answer)


# --------------------------------------------------------------------------------------------
# sql: questions about one table of a fixed schema → one statement
#: table → (noun, text columns, numeric columns); the first text column names a row.
SQL_SCHEMA = {
    "employees": ("employees", ["name", "dept"], ["age", "salary"]),
    "products": ("products", ["name", "category"], ["price", "stock"]),
    "students": ("students", ["name", "major"], ["age", "grade"]),
    "books": ("books", ["title", "author"], ["year", "pages"]),
}
_SQL_VALUES = {"dept": ["sales", "legal", "research"], "category": ["toys", "food", "tools"],
               "major": ["physics", "history", "art"], "author": ["Austen", "Orwell", "Tolstoy"]}


def _sql(rng: random.Random) -> Example:
    table = _pick(rng, sorted(SQL_SCHEMA))
    noun, texts, nums = SQL_SCHEMA[table]
    key, other = texts
    num = _pick(rng, nums)
    v = rng.randint(2, 99)
    kind = rng.randrange(5)
    if kind == 0:
        word, op = _pick(rng, [("above", ">"), ("below", "<")])
        q, a = (f"List the {key} of {noun} with {num} {word} {v}.",
                f"SELECT {key} FROM {table} WHERE {num} {op} {v};")
    elif kind == 1:
        word, op = _pick(rng, [("above", ">"), ("below", "<")])
        q, a = (f"How many {noun} have {num} {word} {v}?",
                f"SELECT COUNT(*) FROM {table} WHERE {num} {op} {v};")
    elif kind == 2:
        val = _pick(rng, _SQL_VALUES[other])
        q, a = (f"Show the {num} of {noun} whose {other} is {val}.",
                f"SELECT {num} FROM {table} WHERE {other} = '{val}';")
    elif kind == 3:
        agg, fn = _pick(rng, [("average", "AVG"), ("largest", "MAX"), ("smallest", "MIN")])
        q, a = f"What is the {agg} {num} of {noun}?", f"SELECT {fn}({num}) FROM {table};"
    else:
        word, order = _pick(rng, [("highest", "DESC"), ("lowest", "ASC")])
        q, a = (f"List {noun} by {num}, {word} first.",
                f"SELECT * FROM {table} ORDER BY {num} {order};")
    cols = ", ".join(texts + nums)
    return Example(f"Table {table}({cols})\nQuestion: {q}\nSQL:\n", a)


# --------------------------------------------------------------------------------------------
# dates: written date → ISO
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
_DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _dates(rng: random.Random) -> Example:
    year, month = rng.randint(1950, 2030), rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN[month - 1])
    m = MONTHS[month - 1]
    text = _pick(rng, [f"{m} {day}, {year}", f"{day} {m} {year}", f"the {_ordinal(day)} of {m}, {year}",
                       f"{m[:3]} {day} {year}", f"{m} {_ordinal(day)} {year}"])
    return Example(f"Date: {text}\nISO format (YYYY-MM-DD):\n", f"{year:04d}-{month:02d}-{day:02d}")


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("sentiment", MULTIPLE_CHOICE, "review → positive / negative / mixed", _sentiment, steps=40),
    Task("topic", MULTIPLE_CHOICE, "headline → world / sports / business / science", _topic, steps=40),
    Task("grammar", MULTIPLE_CHOICE, "is the sentence grammatical? yes / no", _grammar, steps=120),
    Task("json", GENERATION, "sentence → JSON with name, age, city", _json, steps=60,
         max_new_tokens=32),
    Task("sql", GENERATION, "question on a table → one SQL statement", _sql, steps=120,
         max_new_tokens=32),
    Task("dates", GENERATION, "date in words → ISO YYYY-MM-DD", _dates, steps=80,
         max_new_tokens=12),
]}

#: Rows per split; a test file of 40 rows keeps a full demo evaluation within minutes on a CPU.
DEFAULT_SIZES = {"train": 1000, "validation": 40, "test": 40}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise MergelabError(f"unknown zoo task {name!r}", hint=f"choose from: {', '.join(TASKS)}") from None


def to_row(i: int, task: Task, ex: Example, split: str) -> dict[str, str]:
    """A competition CSV row for one example."""
    return {"id": f"{task.name}-{split}-{i:04d}", "input": ex.input, "target": ex.target,
            "answer_choices": json.dumps(list(ex.choices)) if ex.choices else "",
            "eval_type": task.eval_type}


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write rows in the competition format (all fields quoted where needed, LF line ends)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path


def write_task_csvs(task: Task, out_dir: str | Path, *, seed: int = 0,
                    sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``out_dir/{train,validation,test}.csv`` for ``task``; returns the paths by split."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    examples = task.examples(seed, sizes)
    return {split: write_csv(out_dir / f"{split}.csv",
                             [to_row(i, task, ex, split) for i, ex in enumerate(examples[split])])
            for split in SPLITS}


def write_all(out_dir: str | Path, *, seed: int = 0, tasks: list[str] | None = None,
              sizes: dict[str, int] | None = None) -> dict[str, dict[str, Path]]:
    """Write the CSVs of every task to ``out_dir/<task>/<split>.csv``."""
    names = tasks or list(TASKS)
    return {n: write_task_csvs(get_task(n), Path(out_dir) / n, seed=seed, sizes=sizes) for n in names}
