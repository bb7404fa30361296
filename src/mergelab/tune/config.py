"""The ``tune:`` section of a recipe: what to search, on which data, with what budget.

::

    tune:
      params:
        lambda: {low: 0.2, high: 1.5}                      # one global value
        weight: {low: 0.0, high: 1.0}                      # one value per expert
        density: {low: 0.1, high: 1.0, per_expert: true}   # per expert although global is allowed
        lambda: {low: 0.5, high: 1.5, groups: [self_attn, mlp]}   # one value per module filter
        weight: {low: 0.0, high: 1.0, layers: 3}           # 3 anchors across the depth
      objective: score            # or entropy (unlabelled inputs)
      metric: rougeL              # generation rows in `score`: rougeL, exact_match, rouge1, rouge2
      below_base_penalty: 1.0     # `score` − 1.0 × Σ over tasks of max(0, base's score − merge's)
      data: [val/a.csv, val/b.csv]
      check_fraction: 0.5         # share of each file's rows held out as the check part
      trials: 30
      time_limit: 10m
      sampler: tpe                # or cmaes
      seed: 0
      optimizer: optuna           # or gradient: Adam on the entropy (task_arithmetic / linear;
      steps: 50                   #   params default to one weight per expert per layer);
      learning_rate: 0.01         #   steps and learning_rate are its own (mergelab.tune.gradient)

The section's schema lives with the recipe's (:mod:`mergelab.recipe.sections`);
:class:`SearchSpace` turns it into named search dimensions and writes a sampled point back into a
plain recipe mapping, which :func:`mergelab.recipe.load_recipe` validates.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping


from mergelab.errors import RecipeError
from mergelab.recipe.sections import TuneError, TuneSection
from mergelab.util import sha256_file
from mergelab.methods import get_method
from mergelab.recipe import check_param


# ----------------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """One searched number: where it goes in the recipe and its range."""

    name: str            # e.g. "weight[1]@self_attn#0"
    key: str             # the method parameter
    expert: int | None   # None: the method's global value
    group: str | None    # module filter, or None
    layer: int | None    # anchor index across depth, or None
    low: float
    high: float
    log: bool


def round_value(v: float) -> float:
    """Four significant digits: what a trial uses and what the tuned recipe says."""
    return float(f"{float(v):.4g}")


class SearchSpace:
    """The search dimensions of a tune section for one recipe (method and experts known)."""

    def __init__(self, recipe_data: Mapping[str, Any], section: TuneSection):
        method = recipe_data.get("method")
        name = method if isinstance(method, str) else (method or {}).get("name")
        try:
            spec = get_method(name)
        except RecipeError as exc:
            raise TuneError(f"method.name: {exc.message}", hint=exc.hint) from None
        experts = recipe_data.get("experts") or []
        self.recipe_data = dict(recipe_data)
        if isinstance(method, str):
            self.recipe_data["method"] = {"name": method}
        self.n_experts = len(experts)
        self.method = spec.name
        self.dims: list[Dimension] = []
        for key, rng in section.params.items():
            where = f"tune.params.{key}"
            known = set(spec.expert_params) | set(spec.global_params)
            if key not in known:
                raise TuneError(f"{where}: {spec.name} has no parameter {key!r}; its parameters: "
                                f"{', '.join(sorted(known)) or 'none'}")
            if key == "rows":
                raise TuneError(f"{where}: rows sets how much data the statistics pass reads, once per "
                                "search; it is not searched", hint="set method.rows in the recipe")
            problems = check_param(f"{where}.low", key, rng.low) + check_param(f"{where}.high", key, rng.high)
            if problems:
                raise TuneError("; ".join(problems))
            per_expert = rng.per_expert
            if per_expert is None:
                per_expert = key in spec.expert_params and key not in spec.global_params
            if per_expert and key not in spec.expert_params:
                raise TuneError(f"{where}.per_expert: {spec.name} takes {key!r} only as a global value")
            if not per_expert and key not in spec.global_params:
                raise TuneError(f"{where}.per_expert: {spec.name} takes {key!r} only per expert "
                                "(set per_expert: true or leave it out)")
            for expert in (range(self.n_experts) if per_expert else [None]):
                for group in (rng.groups or [None]):
                    for layer in (range(rng.layers) if rng.layers else [None]):
                        label = key if expert is None else f"{key}[{expert}]"
                        label += f"@{group}" if group else ""
                        label += f"#{layer}" if layer is not None else ""
                        self.dims.append(Dimension(label, key, expert, group, layer, rng.low, rng.high, rng.log))
        self.section = section

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def recipe_dict(self, values: Mapping[str, float]) -> dict:
        """The recipe mapping with the searched values written in (rounded by :func:`round_value`)."""
        data = copy.deepcopy(self.recipe_data)
        data["method"] = dict(data["method"])
        data["experts"] = [dict(e) for e in data["experts"]]
        slots: dict[tuple[str, int | None], list[Dimension]] = {}
        for d in self.dims:
            slots.setdefault((d.key, d.expert), []).append(d)
        for (key, expert), dims in slots.items():
            target = data["method"] if expert is None else data["experts"][expert]
            rng = self.section.params[key]
            v = lambda d: round_value(values[d.name])  # noqa: E731
            if rng.groups:
                entries = []
                for g in rng.groups:
                    gd = [d for d in dims if d.group == g]
                    entries.append({"filter": g, "value": [v(d) for d in gd] if rng.layers else v(gd[0])})
                fixed = target.get(key)
                if isinstance(fixed, list) and fixed and all(isinstance(e, Mapping) for e in fixed):
                    entries += [dict(e) for e in fixed]
                elif fixed is not None:
                    entries.append({"value": fixed})
                target[key] = entries
            elif rng.layers:
                target[key] = [v(d) for d in dims]
            else:
                target[key] = v(dims[0])
        return data

    def start_point(self) -> dict[str, float]:
        """The recipe's own values of the searched dimensions, where it sets a plain number in range."""
        out = {}
        for d in self.dims:
            src = self.recipe_data["method"] if d.expert is None else self.recipe_data["experts"][d.expert]
            value = src.get(d.key)
            if isinstance(value, str):  # YAML reads 1e-3 as text
                try:
                    value = float(value)
                except ValueError:
                    value = None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and d.low <= value <= d.high:
                out[d.name] = value
        return out


def fingerprint(recipe_data: Mapping[str, Any], section: TuneSection) -> str:
    """What a study's trials depend on: the recipe, the search space, the objective and data,
    the split and the evaluation options (not the budget, sampler or storage)."""

    payload = {
        "recipe": json.loads(json.dumps(recipe_data, sort_keys=True, default=str)),
        "params": {k: v.model_dump() for k, v in section.params.items()},
        "objective": section.objective,
        "metric": section.metric,
        "data": [sha256_file(f) for f in section.data],
        "split": [section.check_fraction, section.rows_per_task, section.split_seed],
        "eval": section.eval,
    }
    if section.below_base_penalty:   # only when set: studies made before the option keep their fingerprint
        payload["below_base_penalty"] = section.below_base_penalty
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
