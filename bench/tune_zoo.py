"""Tune benchmark (issue 9): does `mergelab tune` beat the fixed merges on the demo zoo, honestly?

On the demo zoo (SmolLM2-135M-Instruct, one rank-8 q/v LoRA expert per synthetic task: sentiment,
topic, grammar (multiple choice), json, sql, dates (generation)) one run measures, side by side:

1. **fixed merges** — the demo's methods with their published form and the one scale each that
   was chosen once on the validation split (``mergelab.zoo.demo.DEMO_MERGES``, plain ``regmean``
   among them, its Gram matrices from each task's validation inputs); merged into one adapter and
   scored on the **test** files exactly as ``mergelab demo`` does (``merge_to_adapter``,
   ``evaluate_cached``, normalised score = merged ÷ expert per task, averaged over the tasks);
2. **tuned-λ task arithmetic** — the peer: a ``mergelab tune`` study over the single λ of task
   arithmetic;
3. **tuned merges** — ``mergelab tune`` studies over richer spaces (per-expert weights, per-group
   scales, RegMean's parameters; see ``CONFIGS``); ``--configs ta_adamerging`` adds task arithmetic's
   per-layer weights learned by gradient descent on entropy (``optimizer: gradient``, AdaMerging;
   ``--steps``, ``--learning-rate``), scored like the others but never the headline (its validation
   values are entropies, not scores).

Every study searches on the zoo's **validation** CSVs only (``rows_per_task`` rows of each task,
half search / half check, the product's own split and objective); its winner
(``recipe.tuned.yaml``) is then merged with ``merge_to_adapter`` — what ``mergelab run`` does —
and scored on the test files, which no search ever sees. Among the tuned configurations the
headline is the one whose winner scores best on the validation rows (search and check parts
together), never the one that scores best on the test files.

Per study: normalised test score and per-task scores, the winner's search/check scores, trials,
wall time, trials per minute, time to the best trial (from the ``run_tune`` call, so the base
loading and RegMean's statistics count), and the difference in points to the best fixed merge,
to the best data-free fixed merge (all but RegMean, which reads unlabelled task inputs) and to
tuned-λ task arithmetic; then whether the issue's goals (≥ 90 % normalised, ≥ 10 points above
the best fixed merge) are met. Results go to ``--out`` (``results.json``, ``results.md``,
each study's folder with its ``report.md`` and the merged adapters).

    python bench/tune_zoo.py [--zoo DIR] [--device cpu] [--out DIR] [--trials N] [--ta-trials N]
                             [--time-limit 10m] [--rows-per-task 16] [--configs a,b] [--fixed a,b]
                             [--fixed-from DEMO_OUT/scores.json] [--gram-split validation]
                             [--metric rougeL] [--seed 0] [--threads N] [--quick]
                             [--steps 20] [--learning-rate 0.02]

The default run took 25 minutes on the project's 2-core CPU shared with another job (load ≈ 2; a
trial scores 96 validation rows in ~20 s; docs/tune-bench.md has the figures); ``--quick`` is a
smoke test of a few minutes (few trials on few rows: its figures mean nothing). Seeds are fixed,
so a rerun on the same machine repeats the same trials.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from _measure import load_average

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GOAL_NORMALISED = 0.90       # the goals
GOAL_POINTS_OVER_FIXED = 10.0


@dataclass(frozen=True)
class TuneConfig:
    """One search: the recipe's method (its values are the first trial) and the ``tune.params``."""

    label: str
    method: dict
    params: dict
    about: str
    expert: dict = field(default_factory=dict)   # per-expert recipe keys (starting values)
    sampler: str = "tpe"
    data_aware: bool = False                     # each expert gets `data:` (its task's inputs)
    optimizer: str = "optuna"                    # or gradient (params {}: its default, weight per expert per layer)


#: The peer: task arithmetic with one searched λ, started from the demo's λ. On a log scale: the
#: good values are small (0.3 beats 0.5 and 1.0 on validation), and a uniform draw in [0.05, 1]
#: rarely lands below 0.3 in the sampler's first, random trials.
TA_LAMBDA = TuneConfig(
    "ta_lambda", {"name": "task_arithmetic", "lambda": 0.3},
    {"lambda": {"low": 0.05, "high": 1.0, "log": True}}, "task arithmetic, one λ in [0.05, 1] (log scale)")

#: The tuned configurations this benchmark knows; ``DEFAULT_CONFIGS`` are run unless ``--configs``.
CONFIGS: dict[str, TuneConfig] = {c.label: c for c in (
    TuneConfig("iso_c_weights", {"name": "iso_c", "lambda": 1.5},
               {"weight": {"low": 0.25, "high": 2.0}, "lambda": {"low": 0.8, "high": 2.5}},
               "Iso-C, per-expert weight in [0.25, 2] and λ in [0.8, 2.5], from the demo's Iso-C",
               expert={"weight": 1.0}, sampler="cmaes"),
    TuneConfig("iso_c_groups", {"name": "iso_c", "lambda": 1.5},
               {"lambda": {"low": 0.5, "high": 3.0, "groups": ["q_proj", "v_proj"]}},
               "Iso-C, one λ for q_proj and one for v_proj in [0.5, 3]", sampler="cmaes"),
    TuneConfig("ta_weights", {"name": "task_arithmetic", "lambda": 0.3},
               {"weight": {"low": 0.0, "high": 1.5}, "lambda": {"low": 0.1, "high": 1.0}},
               "task arithmetic, per-expert weight in [0, 1.5] and λ (LoraHub-style)",
               expert={"weight": 1.0}, sampler="cmaes"),
    TuneConfig("ties_weights", {"name": "ties", "density": 0.2, "lambda": 1.0},
               {"weight": {"low": 0.25, "high": 2.0}, "density": {"low": 0.1, "high": 0.9, "per_expert": True}},
               "TIES, per-expert weight and density", expert={"weight": 1.0}, sampler="cmaes"),
    TuneConfig("regmean", {"name": "regmean", "alpha": 0.9, "lambda": 1.0},
               {"lambda": {"low": 0.5, "high": 3.0, "groups": ["q_proj", "v_proj"]},
                "alpha": {"low": 0.0, "high": 1.0}, "weight": {"low": 0.2, "high": 2.0}},
               "RegMean, λ per q/v group, α and per-expert weight, from plain RegMean",
               expert={"weight": 1.0}, sampler="cmaes", data_aware=True),
    # RegMean++ (statistics measured in the merged model): every trial measures them anew, as the
    # merge's parameters change what the merged layers pass on (≈ 63 s a trial on an idle 2-core CPU:
    # ≈ 40 s of merge and statistics, then the scoring)
    TuneConfig("regmean_pp", {"name": "regmean_pp", "alpha": 0.9, "lambda": 1.0},
               {"alpha": {"low": 0.5, "high": 1.0}, "weight": {"low": 0.5, "high": 2.0}},
               "RegMean++, α in [0.5, 1] and per-expert weight in [0.5, 2], from plain RegMean++",
               expert={"weight": 1.0}, sampler="cmaes", data_aware=True),
    # AdaMerging: λ per task per layer in [0, 1] from 0.3, Adam on the entropy of the unlabelled
    # validation inputs (search part); its objective is no score, so it is never the headline
    TuneConfig("ta_adamerging", {"name": "task_arithmetic", "lambda": 1.0}, {},
               "task arithmetic, weight per expert per layer in [0, 1] from 0.3, gradient descent on entropy "
               "(AdaMerging; search/check values are entropies)", expert={"weight": 0.3}, sampler="adam", optimizer="gradient"),
)}
DEFAULT_CONFIGS = ["iso_c_weights", "regmean"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="a built zoo (default: the demo's, built if missing)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--out", type=Path, default=Path("tune-bench-out"), help="output folder (replaced)")
    ap.add_argument("--trials", type=int, default=20, help="trials per tuned configuration (20)")
    ap.add_argument("--ta-trials", type=int, default=10, help="trials of tuned-λ task arithmetic (10)")
    ap.add_argument("--time-limit", default=None, help="also stop each study after this long (e.g. 10m)")
    ap.add_argument("--rows-per-task", type=int, default=16,
                    help="validation rows per task used by a study, half search / half check (16)")
    ap.add_argument("--configs", default=None, help=f"tuned configurations (default {','.join(DEFAULT_CONFIGS)}; "
                                                    f"known: {', '.join(CONFIGS)})")
    ap.add_argument("--fixed", default=None, help="fixed merges to score (default: all the demo's)")
    ap.add_argument("--fixed-from", type=Path, default=None,
                    help="take the demo merges' test scores from a `mergelab demo` scores.json of this zoo")
    ap.add_argument("--gram-split", default="validation", choices=["validation", "train"],
                    help="whose inputs give RegMean's Gram matrices (validation)")
    ap.add_argument("--metric", default="rougeL", choices=["rougeL", "exact_match", "rouge1", "rouge2"],
                    help="the studies' metric on generation rows (rougeL; the test files are judged by exact match)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed (0)")
    ap.add_argument("--steps", type=int, default=20, help="steps of the gradient configurations (20)")
    ap.add_argument("--learning-rate", type=float, default=0.02,
                    help="Adam's learning rate of the gradient configurations (0.02)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 6 rows per task, 3 trials, 2 fixed merges, the first configuration")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows_per_task, args.trials, args.ta_trials, args.steps = 6, 3, 2, 3
        args.fixed = args.fixed or "task_arithmetic,iso_c"
        args.configs = args.configs or DEFAULT_CONFIGS[0]

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    bench = Bench(args, console)
    return bench.run()


class Bench:
    """One benchmark run: the zoo, the loaded base (for test scoring), fixed merges, studies."""

    def __init__(self, args, console):
        self.args = args
        self.console = console
        self.out: Path = args.out
        self.notes: list[str] = []

    # ----------------------------------------------------------------------------------- run
    def run(self) -> int:
        import torch

        from mergelab.evaluate.loading import load_model_and_tokenizer
        from mergelab.zoo.build import eval_options

        args = self.args
        if args.threads:
            torch.set_num_threads(args.threads)
        t_all = time.perf_counter()
        started = datetime.now(timezone.utc)
        load_start = load_average()
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)

        self.zoo = self._zoo()
        self.model, self.tok = load_model_and_tokenizer(self.zoo.base, device=args.device, dtype="float32")
        self.options = eval_options(args.device)
        self.files = {t: self.zoo.data(t, "test") for t in self.zoo.tasks}
        self.expert = self._expert_scores()

        fixed = self._fixed()
        tuned: dict[str, dict] = {}
        for cfg in [TA_LAMBDA, *self._configs()]:
            trials = args.ta_trials if cfg is TA_LAMBDA else args.trials
            tuned[cfg.label] = self._tune(cfg, trials)

        payload = self._summary(fixed, tuned)
        payload["run"] = {
            "command": "python bench/tune_zoo.py " + " ".join(sys.argv[1:]),
            "started_utc": started.isoformat(timespec="seconds"), "total_s": round(time.perf_counter() - t_all, 1),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in load_average()],
            "device": str(next(self.model.parameters()).device), "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "zoo": str(self.zoo.root), "rows_per_task": args.rows_per_task,
            "seed": args.seed, "notes": self.notes}
        (self.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(payload))
        self._print(payload)
        return 0

    def _note(self, msg: str) -> None:
        self.notes.append(msg)
        self.console.print(f"[yellow]note:[/] {msg}")

    def _zoo(self):
        from mergelab.zoo.base import ZooError
        from mergelab.zoo.build import build_zoo, default_zoo_dir, load_zoo

        root = self.args.zoo or default_zoo_dir()
        if (root / "zoo.json").is_file():
            try:
                return load_zoo(root)
            except ZooError as exc:  # an incomplete zoo: build it (shipped adapters, nothing trained)
                self._note(f"{root}: {exc.message}; building it")
        return build_zoo(root, use_packaged=True, evaluate=False, device=self.args.device, console=self.console)

    def _expert_scores(self) -> dict[str, float]:
        """Each expert on its own task's test file (cached in the zoo, as ``mergelab demo`` does)."""
        from mergelab.zoo.build import ScoreCache, evaluate_cached

        cache = ScoreCache(self.zoo.root / "score-cache.json")
        out = {}
        with self.console.status("experts on their own test files (cached after the first run)…"):
            for t in self.zoo.tasks:
                s, _ = evaluate_cached(self.model, self.tok, self.zoo, {t: self.files[t]},
                                       adapter=self.zoo.adapter(t), options=self.options, cache=cache)
                out[t] = s[t]
        self.console.print("experts: " + ", ".join(f"{t} {v:.3f}" for t, v in out.items()))
        return out

    def _configs(self) -> list[TuneConfig]:
        names = [n for n in (self.args.configs.split(",") if self.args.configs else DEFAULT_CONFIGS) if n]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
        return [CONFIGS[n] for n in names]

    # ------------------------------------------------------------------------------- scoring
    def _merge_and_score(self, recipe, dest: Path) -> dict:
        """Merge ``recipe`` into one adapter at ``dest`` and score it on every test file."""
        from mergelab.merge.adapter import merge_to_adapter
        from mergelab.recipe import load_recipe
        from mergelab.zoo.build import evaluate_cached

        t0 = time.perf_counter()
        merged = merge_to_adapter(load_recipe(recipe), dest, device=self.args.device, progress=False)
        merge_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, _ = evaluate_cached(self.model, self.tok, self.zoo, self.files, adapter=dest,
                                    options=self.options, cache=None)
        return {"scores": scores, "normalised": self._normalised(scores), "merge_s": round(merge_s, 1),
                "eval_s": round(time.perf_counter() - t0, 1), "rank": merged.max_rank}

    def _normalised(self, scores: dict[str, float]) -> dict:
        norm = {t: scores[t] / self.expert[t] for t in self.zoo.tasks if self.expert[t] > 0}
        return {"per_task": norm, "mean": sum(norm.values()) / len(norm)}

    def _expert_entries(self, *, data: bool, extra: dict | None = None) -> list[dict]:
        out = []
        for t in self.zoo.tasks:
            e = {"path": str(self.zoo.adapter(t)), **(extra or {})}
            if data:
                e["data"] = str(self.zoo.data(t, self.args.gram_split))
            out.append(e)
        return out

    def _fixed(self) -> dict[str, dict]:
        from mergelab.zoo.demo import DEMO_MERGES, demo_recipe

        args, console = self.args, self.console
        known = [m.label for m in DEMO_MERGES]
        wanted = args.fixed.split(",") if args.fixed else known
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown fixed merge(s) {', '.join(unknown)}; known: {', '.join(known)}")
        reused = self._fixed_from(wanted) if args.fixed_from else {}
        results: dict[str, dict] = {}
        console.rule("fixed merges (test files)")
        for m in DEMO_MERGES:
            if m.label not in wanted:
                continue
            if m.label in reused:
                results[m.label] = reused[m.label]
            else:
                r = self._merge_and_score(demo_recipe(self.zoo, m), self.out / "fixed" / m.label)
                results[m.label] = {"method": m.method, "output": m.output, "source": "this run", **r}
            self._say_fixed(m.label, results[m.label])
        return results

    def _say_fixed(self, label: str, r: dict) -> None:
        extra = "" if r.get("source") == "this run" else f"  ({r['source']})"
        self.console.print(f"  {label:18} normalised {r['normalised']['mean']:6.1%}  "
                           f"merge {r.get('merge_s', 0):5.1f} s  eval {r.get('eval_s', 0):4.0f} s{extra}")

    def _fixed_from(self, wanted: list[str]) -> dict[str, dict]:
        """Demo merges' test scores from a ``mergelab demo`` run on the same zoo and experts."""
        p = json.loads(self.args.fixed_from.read_text())
        same = all(abs(p["expert_scores"].get(t, -1) - self.expert[t]) < 1e-12 for t in self.zoo.tasks)
        if not same or Path(p.get("zoo", "")).resolve() != Path(self.zoo.root).resolve():
            raise SystemExit(f"{self.args.fixed_from}: made on another zoo or with other experts "
                             f"({p.get('zoo')}); rerun without --fixed-from")
        out = {}
        for label, r in p["merges"].items():
            if label in wanted:
                out[label] = {"method": r["method"], "output": r["output"], "scores": r["scores"],
                              "normalised": self._normalised(r["scores"]), "merge_s": r.get("merge_s"),
                              "eval_s": r.get("eval_s"), "source": f"from {self.args.fixed_from}"}
        self._note(f"demo merges {', '.join(out)}: test scores taken from {self.args.fixed_from}")
        return out

    # -------------------------------------------------------------------------------- tuning
    def tune_recipe(self, cfg: TuneConfig, trials: int) -> dict:
        """The recipe with its ``tune:`` section for one configuration (validation files only)."""
        o = self.options
        tune = {"params": cfg.params, "objective": "score", "metric": self.args.metric,
                "data": [str(self.zoo.data(t, "validation")) for t in self.zoo.tasks],
                "check_fraction": 0.5, "rows_per_task": self.args.rows_per_task, "split_seed": 0,
                "trials": trials, "sampler": cfg.sampler, "seed": self.args.seed,
                # the zoo's evaluation (batch, answer length, cut at the newline), in float32
                "eval": {"batch_size": o.batch_size, "max_new_tokens": o.max_new_tokens, "stop": list(o.stop),
                         "dtype": "float32"}}
        if cfg.optimizer == "gradient":   # objective entropy (implied): no metric, no trials, no sampler
            for k in ("objective", "metric", "trials", "sampler"):
                del tune[k]
            tune.update(optimizer="gradient", steps=self.args.steps, learning_rate=self.args.learning_rate)
            if not cfg.params:
                del tune["params"]
        if self.args.time_limit:
            tune["time_limit"] = self.args.time_limit
        return {"base": {"path": str(self.zoo.base)},
                "experts": self._expert_entries(data=cfg.data_aware, extra=cfg.expert),
                "method": dict(cfg.method), "output": {"format": "lora"}, "seed": self.zoo.seed, "tune": tune}

    def _tune(self, cfg: TuneConfig, trials: int) -> dict:
        import yaml

        from mergelab.errors import MergelabError
        from mergelab.tune import run_tune

        console = self.console
        budget = f"{self.args.steps} steps" if cfg.optimizer == "gradient" else f"{trials} trials"
        console.rule(f"tune [bold]{cfg.label}[/]: {cfg.about} ({budget}, {cfg.sampler})")
        d = self.out / "tune" / cfg.label
        d.mkdir(parents=True)
        recipe_path = d / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(self.tune_recipe(cfg, trials), sort_keys=False, allow_unicode=True))
        called = datetime.now()          # optuna stamps trials with naive local time
        t0 = time.perf_counter()
        try:
            result = run_tune(recipe_path, d / "study", device=self.args.device,
                              progress=lambda msg: console.print(f"  {msg}", highlight=False))
        except MergelabError as exc:
            self._note(f"{cfg.label}: the search failed: {exc}")
            return {"about": cfg.about, "error": str(exc)}
        tune_s = time.perf_counter() - t0
        timing = study_timing(result, called) if result.optimizer == "optuna" else gradient_timing(result, tune_s)
        best = result.best
        test = self._merge_and_score(d / "study" / "recipe.tuned.yaml", d / "adapter")
        r = {"about": cfg.about, "method": cfg.method, "params": cfg.params, "sampler": cfg.sampler,
             "winner": {"trial": best.number, "values": best.values, "search": best.search, "check": best.check,
                        "validation": (best.search + best.check) / 2,
                        "search_tasks": best.search_tasks, "check_tasks": best.check_tasks,
                        "is_start": best.start},
             "optimizer": result.optimizer, "trajectory": result.trajectory,
             "trials": len(result.trials), "failed": result.failed, "stopped_by": result.stopped_by,
             "tune_s": round(tune_s, 1), **timing, "warnings": result.warnings, **test}
        console.print(f"  winner trial {best.number}: search {best.search:.3f}, check {best.check:.3f}; "
                      f"test normalised [bold]{test['normalised']['mean']:.1%}[/]; "
                      f"{timing['trials_per_min']:.2f} trials/min, best after {timing['to_best_s']:.0f} s")
        return r

    # ------------------------------------------------------------------------------- summary
    def _summary(self, fixed: dict, tuned: dict) -> dict:
        best_fixed = _best(fixed)
        bf = fixed[best_fixed]["normalised"]["mean"] if best_fixed else None
        # RegMean reads unlabelled inputs; the demo's merges read nothing but the weights
        free = {k: r for k, r in fixed.items() if not _data_aware(r["method"]["name"])}
        best_free = _best(free)
        bff = free[best_free]["normalised"]["mean"] if best_free else None
        ta = tuned.get(TA_LAMBDA.label, {})
        ta_norm = ta["normalised"]["mean"] if "normalised" in ta else None
        ok = {k: r for k, r in tuned.items() if "normalised" in r}
        for r in ok.values():
            n = r["normalised"]["mean"]
            r["points_vs_best_fixed"] = None if bf is None else round(100 * (n - bf), 1)
            r["points_vs_best_data_free"] = None if bff is None else round(100 * (n - bff), 1)
            r["points_vs_ta_lambda"] = None if ta_norm is None else round(100 * (n - ta_norm), 1)
            r["goals"] = {"normalised_ge_90": n >= GOAL_NORMALISED,
                          "ge_10_points_over_best_fixed": bf is not None and 100 * (n - bf) >= GOAL_POINTS_OVER_FIXED,
                          "ge_10_points_over_best_data_free": bff is not None
                          and 100 * (n - bff) >= GOAL_POINTS_OVER_FIXED}
        # the headline: the tuned configuration (not the peer) whose winner is best on validation
        candidates = [k for k in ok if k != TA_LAMBDA.label and ok[k].get("optimizer", "optuna") == "optuna"]
        headline = max(candidates, key=lambda k: ok[k]["winner"]["validation"]) if candidates else None
        return {"tasks": list(self.zoo.tasks), "expert_scores": self.expert,
                "metric": "accuracy (multiple choice), exact match (generation); normalised = merged ÷ expert",
                "tune_objective": "validation score: accuracy (MC), "
                                  + {"rougeL": "ROUGE-L F", "exact_match": "exact match", "rouge1": "ROUGE-1 F",
                                     "rouge2": "ROUGE-2 F"}[self.args.metric] + " (generation), mean over tasks",
                "fixed": fixed, "best_fixed": best_fixed, "best_data_free": best_free, "tuned": tuned,
                "headline": headline,
                "goals": {"normalised": GOAL_NORMALISED, "points_over_best_fixed": GOAL_POINTS_OVER_FIXED}}

    def _print(self, p: dict) -> None:
        from rich.table import Table

        console = self.console
        tasks = p["tasks"]
        table = Table(title="Demo zoo, test files: normalised score (merged ÷ expert)", title_justify="left")
        table.add_column("merge", no_wrap=True)
        for t in tasks:
            table.add_column(t[:5], justify="right")
        for c in ("mean", "Δ fixed", "Δ free", "Δ TA-λ", "trials", "/min", "to best"):
            table.add_column(c, justify="right")
        for label, r in p["fixed"].items():
            table.add_row(f"fixed {label}" + (" ★" if label == p["best_fixed"] else ""),
                          *[f"{r['normalised']['per_task'].get(t, 0):.0%}" for t in tasks],
                          f"{r['normalised']['mean']:.1%}", "", "", "", "", "", "",
                          end_section=label == list(p["fixed"])[-1])
        for label, r in p["tuned"].items():
            if "normalised" not in r:
                table.add_row(f"tuned {label}", *["–"] * len(tasks), "failed", "", "", "", "", "", "")
                continue
            table.add_row(f"tuned {label}" + (" ◆" if label == p["headline"] else ""),
                          *[f"{r['normalised']['per_task'].get(t, 0):.0%}" for t in tasks],
                          f"[bold]{r['normalised']['mean']:.1%}[/]", _pts(r["points_vs_best_fixed"]),
                          _pts(r["points_vs_best_data_free"]), _pts(r["points_vs_ta_lambda"]), str(r["trials"]), f"{r['trials_per_min']:.2f}",
                          f"{r['to_best_s']:.0f} s")
        console.print(table)
        console.print("★ best fixed merge; Δ free: vs the best data-free fixed merge (all but RegMean); "
                      "◆ headline: the tuned configuration best on the validation rows")
        h = p["headline"]
        if h:
            r = p["tuned"][h]
            g = r["goals"]
            console.print(f"headline {h}: {r['normalised']['mean']:.1%} normalised "
                          f"({'meets' if g['normalised_ge_90'] else 'misses'} the ≥ 90% goal); "
                          f"{_pts(r['points_vs_best_fixed'])} points vs the best fixed merge {p['best_fixed']} "
                          f"({'meets' if g['ge_10_points_over_best_fixed'] else 'misses'} the ≥ +10 goal); "
                          f"{_pts(r['points_vs_best_data_free'])} points vs the best data-free fixed merge "
                          f"{p['best_data_free']} ({'meets' if g['ge_10_points_over_best_data_free'] else 'misses'} "
                          f"the ≥ +10 goal); {_pts(r['points_vs_ta_lambda'])} points vs tuned-λ task arithmetic")
        run = p["run"]
        console.print(f"total {run['total_s']:.0f} s on {run['device']} ({run['torch_threads']} torch threads); "
                      f"load average {run['load_average_start']} → {run['load_average_end']}; "
                      f"wrote {self.out / 'results.md'}, {self.out / 'results.json'}")


def _best(merges: dict) -> str | None:
    return max(merges, key=lambda k: merges[k]["normalised"]["mean"]) if merges else None


def _data_aware(method: str) -> bool:
    """Whether a method reads unlabelled task inputs (RegMean) rather than the weights alone."""
    from mergelab.methods import get_method

    return get_method(method).needs_gram


def study_timing(result, called: datetime) -> dict:
    """Trials per minute and time to the best trial, from the study's own trial timestamps.

    ``to_best_s``: from the ``run_tune`` call (base loading, statistics) to the completion of the
    winning trial; ``setup_s``: from the call to the first trial's start; ``trials_per_min``:
    finished trials over the span from the first trial's start to the last one's end.
    """
    import optuna

    st = optuna.load_study(study_name=result.study_name, storage=result.storage)
    done = [t for t in st.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    first = min(t.datetime_start for t in done)
    last = max(t.datetime_complete for t in done)
    best = next(t for t in done if t.number == result.best.number)
    span = (last - first).total_seconds()
    return {"setup_s": round((first - called).total_seconds(), 1),
            "search_s": round(span, 1),
            "trials_per_min": round(60 * len(done) / span, 2) if span > 0 else float("nan"),
            "mean_trial_s": round(sum(t.duration.total_seconds() for t in done) / len(done), 1),
            "to_best_s": round((best.datetime_complete - called).total_seconds(), 1)}


def gradient_timing(result, tune_s: float) -> dict:
    """The timing fields of a gradient run, as a study's: a step counts as a trial, the winner is the
    final point (reached at the end)."""
    steps = max(result.new_trials, 1)
    search_s = result.trials[-1].seconds
    return {"setup_s": round(tune_s - search_s, 1), "search_s": round(search_s, 1),
            "trials_per_min": round(60 * steps / search_s, 2) if search_s > 0 else float("nan"),
            "mean_trial_s": round(search_s / steps, 1), "to_best_s": round(tune_s, 1)}


def _pts(v) -> str:
    return "–" if v is None else f"{v:+.1f}"


def markdown(p: dict) -> str:
    """``results.md``: the table of every merge, the studies' timings and the goals."""
    tasks = p["tasks"]
    run = p["run"]
    lines = ["# Tune benchmark on the demo zoo", "",
             f"`{run['command']}` — {run['started_utc']}, {run['device']} ({run['torch_threads']} torch threads, "
             f"{run['cpus']} CPUs), load average {run['load_average_start']} at the start, "
             f"{run['load_average_end']} at the end; {run['total_s']:.0f} s in all.", "",
             f"Test metric: {p['metric']}. Studies search on {run['rows_per_task']} validation rows per task "
             f"(half search, half check; objective: {p['tune_objective']}).", "",
             "| merge | " + " | ".join(tasks) + " | normalised | Δ best fixed | Δ best data-free | Δ TA-λ |",
             "|---|" + "---:|" * (len(tasks) + 4),
             "| experts (own task) | " + " | ".join(f"{p['expert_scores'][t]:.2f}" for t in tasks) + " | 100% | | | |"]
    for label, r in p["fixed"].items():
        star = " (best fixed)" if label == p["best_fixed"] else ""
        lines.append(f"| fixed {label}{star} | " + " | ".join(
            f"{r['scores'][t]:.3f} ({r['normalised']['per_task'].get(t, 0):.0%})" for t in tasks)
            + f" | {r['normalised']['mean']:.1%} | | | |")
    for label, r in p["tuned"].items():
        if "normalised" not in r:
            lines.append(f"| tuned {label} | " + " | ".join("–" for _ in tasks) + f" | failed: {r['error']} | | | |")
            continue
        mark = " (headline)" if label == p["headline"] else ""
        lines.append(f"| **tuned {label}**{mark} | " + " | ".join(
            f"{r['scores'][t]:.3f} ({r['normalised']['per_task'].get(t, 0):.0%})" for t in tasks)
            + f" | **{r['normalised']['mean']:.1%}** | {_pts(r['points_vs_best_fixed'])} | "
              f"{_pts(r['points_vs_best_data_free'])} | {_pts(r['points_vs_ta_lambda'])} |")
    lines += ["", "## Studies", "",
              "| study | space | sampler | trials | winner | search | check | trials/min | s/trial | "
              "setup s | time to best | wall s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in p["tuned"].items():
        if "winner" not in r:
            continue
        w = r["winner"]
        lines.append(f"| {label} | {r['about']} | {r['sampler']} | {r['trials']} | {w['trial']}"
                     f"{' (start)' if w['is_start'] else ''} | {w['search']:.3f} | {w['check']:.3f} | "
                     f"{r['trials_per_min']:.2f} | {r['mean_trial_s']:.1f} | {r['setup_s']:.0f} | "
                     f"{r['to_best_s']:.0f} s | {r['tune_s']:.0f} |")
    lines += ["", "## Winners", ""]
    for label, r in p["tuned"].items():
        if "winner" in r:
            vals = ", ".join(f"`{k}` {v:g}" for k, v in r["winner"]["values"].items())
            lines.append(f"- **{label}** (trial {r['winner']['trial']}): {vals}")
            lines += [f"  - ⚠ {w}" for w in r["warnings"]]
    h = p["headline"]
    lines += ["", "## Goals", ""]
    if h:
        r = p["tuned"][h]
        lines.append(f"Headline (chosen by validation score, not test): **{h}**, "
                     f"{r['normalised']['mean']:.1%} normalised; best fixed **{p['best_fixed']}** "
                     f"{p['fixed'][p['best_fixed']]['normalised']['mean']:.1%}.")
        lines.append(f"- ≥ 90% normalised: **{'met' if r['goals']['normalised_ge_90'] else 'not met'}**")
        lines.append(f"- ≥ 10 points above the best fixed merge ({p['best_fixed']}): "
                     f"**{'met' if r['goals']['ge_10_points_over_best_fixed'] else 'not met'}** "
                     f"({_pts(r['points_vs_best_fixed'])} points)")
        if p["best_data_free"] and p["best_data_free"] != p["best_fixed"]:
            lines.append(f"- ≥ 10 points above the best data-free fixed merge ({p['best_data_free']}, "
                         f"{p['fixed'][p['best_data_free']]['normalised']['mean']:.1%}): "
                         f"**{'met' if r['goals']['ge_10_points_over_best_data_free'] else 'not met'}** "
                         f"({_pts(r['points_vs_best_data_free'])} points)")
    else:
        lines.append("No tuned configuration finished.")
    if run["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
