"""``judge similar``: evidence that two teams' submissions are near copies, for a person to weigh.

For each pair of submissions from different teams, three signals:

* **prediction agreement** on the hidden rows, against the agreement expected between two
  *independent* models of the same accuracies: on a multiple-choice row with ``k`` choices
  ``e = pa·pb + (1−pa)(1−pb)/(k−1)`` (both right, or both wrong on the same of the ``k−1`` wrong
  choices, uniformly); on a generation row ``e = pa·pb`` (two wrong texts are taken not to
  coincide), where ``pa``, ``pb`` are each submission's accuracy (exact match for generation) on
  that kind of row. ``z = (observed − expected) / sqrt(Σ e(1−e)) · n``; flagged when the excess
  is at least ``min_excess`` and ``z ≥ min_z``;
* **weight similarity**: the cosine of the submissions' task-vector fingerprints
  (:mod:`.fingerprint`); flagged at ``≥ min_cosine``;
* **recipe equivalence**: the same base, the same experts (Hub commit or file contents), the same
  method, and every other setting (method parameters, expert weights, fine-tuning, evaluation
  options; not the seed) equal, numbers within ``rel_tol``.

Nothing is decided here: flagged pairs are listed with their evidence.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergelab.evaluate import read_competition_csv
from mergelab.evaluate.metrics import normalize_text
from mergelab.judge.db import connect, loads
from mergelab.judge.fingerprint import cosine
from mergelab.judge.home import Home
from mergelab.judge.intake import model_entries
from mergelab.progress import TEXT_WIDTH


@dataclass(frozen=True)
class Thresholds:
    min_excess: float = 0.15
    min_z: float = 3.0
    min_cosine: float = 0.9
    rel_tol: float = 0.05


@dataclass
class Pair:
    a: str
    b: str
    team_a: str
    team_b: str
    rows: int = 0
    agreement: float | None = None
    expected: float | None = None
    z: float | None = None
    cosine: float | None = None
    same_recipe: bool = False
    recipe_note: str = ""
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def expected_agreement(pa: float, pb: float, k: int | None) -> float:
    """Agreement of two independent models of accuracies ``pa`` and ``pb`` on one row (see module)."""
    if k is None:
        return pa * pb
    return pa * pb + ((1 - pa) * (1 - pb) / (k - 1) if k > 1 else 0.0)


def _close(x, y, tol: float) -> bool:
    if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
        return x == y
    return abs(x - y) <= tol * max(abs(x), abs(y), 1e-12)


def _close_tree(x, y, tol: float) -> bool:
    """Equal structure, numbers within ``tol`` (relative)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return set(x) == set(y) and all(_close_tree(x[k], y[k], tol) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close_tree(a, b, tol) for a, b in zip(x, y))
    return _close(x, y, tol)


def recipe_equivalent(ra: dict, ma: dict, rb: dict, mb: dict, tol: float) -> tuple[bool, str]:
    """Whether two recipes do the same thing (models by identity, method, parameters within ``tol``)."""
    if not ra or not rb:
        return False, "no recipe"
    if ma.get("base") != mb.get("base"):
        return False, "different base"

    def experts(recipe: dict, ids: dict) -> dict:
        out = {}
        for role, entry in model_entries(recipe):
            if role != "base" and isinstance(entry, dict):
                params = {k: v for k, v in entry.items() if k not in ("model", "revision", "path")}
                out[ids.get(role, role)] = params
        return out

    ea, eb = experts(ra, ma), experts(rb, mb)
    if set(ea) != set(eb):
        return False, "different experts"
    for ident in ea:
        if not _close_tree(ea[ident], eb[ident], tol):
            return False, "expert parameters differ"
    rest = lambda r: {k: ({kk: vv for kk, vv in v.items() if kk != "data"} if k == "eval" and isinstance(v, dict)  # noqa: E731
                          else v) for k, v in r.items() if k not in ("base", "experts", "seed")}
    ra_, rb_ = rest(ra), rest(rb)
    if (ra_.get("method") or {}).get("name") != (rb_.get("method") or {}).get("name"):
        return False, "different method"
    for key in sorted(set(ra_) | set(rb_)):
        if not _close_tree(ra_.get(key), rb_.get(key), tol):
            return False, f"{key} differs"
    meth_a = ra_.get("method") or {}
    return True, f"same models and method {meth_a.get('name')}, parameters within {tol:.0%}"


def compare(root: str | Path, *, round_: int | None = None, thresholds: Thresholds = Thresholds()) -> list[Pair]:
    home = Home(Path(root))
    comp = home.load()
    choices = {}
    for t in comp.tasks:
        for r in read_competition_csv(home.inputs / f"{t}.csv"):
            choices[(t, r.id)] = len(r.choices) if r.is_mc else None
    conn = connect(home.database)
    try:
        where, args = ("WHERE s.round = ?", (round_,)) if round_ is not None else ("", ())
        subs = conn.execute(f"SELECT s.id, s.team, s.recipe, s.models, s.status, f.vector FROM submissions s "
                            f"LEFT JOIN fingerprints f ON f.submission = s.id {where} ORDER BY s.seq",
                            args).fetchall()
        preds = {}
        for s in subs:
            rows = conn.execute("SELECT task, row_id, prediction, correct FROM predictions WHERE submission = ?",
                                (s["id"],)).fetchall()
            preds[s["id"]] = {(r["task"], r["row_id"]): (r["prediction"], r["correct"]) for r in rows}
    finally:
        conn.close()

    def accuracy(p: dict) -> tuple[float, float]:
        mc = [c for key, (_, c) in p.items() if choices.get(key) is not None]
        gen = [c for key, (_, c) in p.items() if choices.get(key) is None]
        return (sum(mc) / len(mc) if mc else 0.0, sum(gen) / len(gen) if gen else 0.0)

    out = []
    subs = [s for s in subs if s["status"] != "rejected" or loads(s["recipe"], {})]
    for i, a in enumerate(subs):
        for b in subs[i + 1:]:
            if a["team"] == b["team"]:
                continue
            pair = Pair(a["id"], b["id"], a["team"], b["team"])
            pa, pb = preds[a["id"]], preds[b["id"]]
            common = sorted(set(pa) & set(pb))
            if common:
                acc_a, acc_b = accuracy(pa), accuracy(pb)
                agree, exp, var = 0.0, 0.0, 0.0
                for key in common:
                    k = choices.get(key)
                    x, y = pa[key][0], pb[key][0]
                    agree += float(x == y if k is not None else normalize_text(x) == normalize_text(y))
                    e = expected_agreement(acc_a[0], acc_b[0], k) if k is not None else \
                        expected_agreement(acc_a[1], acc_b[1], None)
                    exp += e
                    var += e * (1 - e)
                n = len(common)
                pair.rows, pair.agreement, pair.expected = n, agree / n, exp / n
                pair.z = (agree - exp) / math.sqrt(var) if var > 0 else (math.inf if agree > exp else 0.0)
                if pair.agreement - pair.expected >= thresholds.min_excess and pair.z >= thresholds.min_z:
                    pair.flags.append(f"predictions agree on {pair.agreement:.0%} of {n} rows where independent "
                                      f"models would agree on {pair.expected:.0%} (z = {pair.z:.1f})")
            if a["vector"] and b["vector"]:
                pair.cosine = cosine(loads(a["vector"]), loads(b["vector"]))
                if pair.cosine is not None and pair.cosine >= thresholds.min_cosine:
                    pair.flags.append(f"task vectors have cosine {pair.cosine:.3f}")
            pair.same_recipe, pair.recipe_note = recipe_equivalent(
                loads(a["recipe"], {}), loads(a["models"], {}), loads(b["recipe"], {}), loads(b["models"], {}),
                thresholds.rel_tol)
            if pair.same_recipe:
                pair.flags.append(f"equivalent recipes: {pair.recipe_note}")
            out.append(pair)
    return out


#: What the short column names of :func:`table` stand for (printed under it).
TABLE_LEGEND = ("agree: share of the common rows with the same prediction; expect: that share for two "
                "independent models of the same accuracies; z: the excess in standard deviations; cosine: of "
                "the task vectors; recipe: same when the recipes are equivalent")


def table(pairs: list[Pair], width: int = TEXT_WIDTH) -> str:
    """One line per pair (flagged first), then the evidence of each flagged pair; at most ``width``
    columns: a team pair too long for its column takes a line of its own above the pair's
    figures, and the evidence wraps. Team names and submission ids are never cut."""
    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    head = ["submissions", "rows", "agree", "expect", "z", "cosine", "recipe"]
    rows = []
    for p in sorted(pairs, key=lambda p: (not p.flags, p.team_a, p.team_b)):
        rows.append(("FLAG" if p.flags else "", f"{p.team_a} / {p.team_b}",
                     [f"{p.a[:8]}/{p.b[:8]}", str(p.rows), f(p.agreement), f(p.expected), f(p.z, ".1f"), f(p.cosine),
                      "same" if p.same_recipe else "-"]))
    widths = [max(len(h), *(len(r[2][i]) for r in rows)) for i, h in enumerate(head)]
    figures_width = sum(widths) + 2 * (len(widths) - 1)
    fits = [len(r[1]) for r in rows if 6 + len(r[1]) + 2 + figures_width <= width]
    teams_width = max([len("teams"), *fits])

    def figures(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [f"flag  {'teams'.ljust(teams_width)}  {figures(head)}".rstrip()]
    for flag, teams, cells in rows:
        if len(teams) <= teams_width:
            lines.append(f"{flag:4}  {teams.ljust(teams_width)}  {figures(cells)}")
            continue
        lines += textwrap.wrap(teams, width, initial_indent=f"{flag:4}  ", subsequent_indent=" " * 6,
                               break_long_words=False, break_on_hyphens=False)
        lines.append(" " * (6 + teams_width + 2) + figures(cells))
    lines += [""] + textwrap.wrap(TABLE_LEGEND, width)
    for p in pairs:
        if p.flags:
            lines.append("")
            lines += textwrap.wrap(f"{p.team_a} ({p.a[:12]}) and {p.team_b} ({p.b[:12]}):", width,
                                   break_long_words=False, break_on_hyphens=False)
            for x in p.flags:
                lines += textwrap.wrap(x, width, initial_indent="  - ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    lines += [""] + textwrap.wrap("(evidence for a person to weigh: nothing is disqualified automatically)", width)
    return "\n".join(lines) + "\n"
