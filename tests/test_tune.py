"""mergelab tune: the tune section, the in-place trial merge, the split, the study and its outputs."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.errors import RecipeError

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine more threads only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "the quick brown fox jumps over lazy dog yes no true false one two three".split()


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for r in rows:
            w.writerow([r["id"], r["input"], r.get("target", ""), json.dumps(r["choices"]), "multiple_choice"])
    return path


def _mc_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"r{i}", "input": " ".join(rng.choice(WORDS) for _ in range(5)) + "\n",
             "choices": ["yes", "no", "true", "false"], "target": 0} for i in range(n)]


def _recipe(tmp: Path, base: Path, experts: list, method: dict, tune: dict | None, name="recipe.yaml",
            **extra) -> Path:
    data = {"base": {"path": str(base)}, "experts": experts, "method": method, **extra}
    if tune is not None:
        data["tune"] = tune
    path = tmp / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load(path):
    from mergelab.testing import load_model
    from mergelab.evaluate.loading import load_tokenizer

    return load_model(path), load_tokenizer(path)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from mergelab.io.checkpoint import CheckpointReader

    r = CheckpointReader(folder)
    try:
        return {k: r.get(k) for k in r.keys()}
    finally:
        r.close()


@pytest.fixture(scope="module")
def strong_loras(zoo, tmp_path_factory):
    """Three LoRA adapters of the llama fixture base, strong enough to change its predictions."""
    from mergelab.testing import make_lora

    root = tmp_path_factory.mktemp("tune_loras")
    base = zoo["llama"].base
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    specs = [dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
             dict(r=8, alpha=16, target_modules=mods[:4], use_rslora=True),
             dict(r=2, alpha=4, target_modules=mods[4:])]
    return [make_lora(base, root / f"lora{i}", seed=50 + i, std=0.3, **s) for i, s in enumerate(specs)]


# ---------------------------------------------------------------------------- in-place merges


@pytest.mark.parametrize("method", [
    {"name": "task_arithmetic", "lambda": [{"filter": "self_attn", "value": [0.6, 1.3]}, {"value": 0.8}]},
    {"name": "ties", "density": 0.5, "lambda": 0.9},
])
def test_inplace_lora_merge_equals_engine(zoo, tmp_path, method):
    from mergelab.merge import merge
    from mergelab.recipe import load_recipe
    from mergelab.merge.inplace import InPlaceMerger

    fz = zoo["llama"]
    experts = [{"path": str(p), "weight": w} for p, w in zip(fz.loras, (0.7, 0.2, 1.1))]
    recipe = load_recipe(yaml.safe_load(_recipe(tmp_path, fz.base, experts, method, None).read_text()))
    model, _ = _load(fz.base)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merger = InPlaceMerger(recipe, model)
    assert merger.mode == "lora"
    # only the adapted tensors are kept and touched
    adapted = {t.name for t in merger.targets}
    assert adapted and all("proj" in n for n in adapted)
    merger.apply(recipe)
    merge(recipe, tmp_path / "merged", progress=False)
    want = _read_weights(tmp_path / "merged")
    got = model.state_dict()
    changed = 0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(before[name], got[name])
    assert changed == len(adapted)
    merger.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_lora_merge_equals_the_adapter_output(zoo, tmp_path):
    """With output format lora (rank-limited TIES) a trial equals base + the adapter `merge` writes."""
    from mergelab.merge import merge
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.recipe import load_recipe
    from mergelab.merge.inplace import InPlaceMerger

    fz = zoo["llama"]
    experts = [{"path": str(p), "weight": w} for p, w in zip(fz.loras, (0.7, 0.2, 1.1))]
    recipe = load_recipe(yaml.safe_load(_recipe(tmp_path, fz.base, experts, {"name": "ties", "density": 0.4}, None,
                                                output={"format": "lora", "rank": 3}).read_text()))
    model, _ = _load(fz.base)
    InPlaceMerger(recipe, model).apply(recipe)
    merge(recipe, tmp_path / "adapter", progress=False)
    want, _ = load_model_and_tokenizer(fz.base, adapter=tmp_path / "adapter", device="cpu", dtype="float32")
    got = model.state_dict()
    for name, w in want.state_dict().items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")


def test_inplace_dense_merge_equals_engine_exactly(zoo, tmp_path):
    from mergelab.merge import merge
    from mergelab.recipe import load_recipe
    from mergelab.merge.inplace import InPlaceMerger

    fz = zoo["llama"]
    experts = [{"path": str(p), "weight": w} for p, w in zip(fz.experts, (0.5, 0.3, 0.9))]
    recipe = load_recipe(yaml.safe_load(_recipe(tmp_path, fz.base, experts,
                                                 {"name": "dare_ties", "density": 0.6}, None).read_text()))
    model, _ = _load(fz.base)
    merger = InPlaceMerger(recipe, model)
    assert merger.mode == "dense"
    merger.apply(recipe)
    merge(recipe, tmp_path / "merged", progress=False)
    got = model.state_dict()
    for name, w in _read_weights(tmp_path / "merged").items():
        assert torch.equal(got[name], w), name


# ------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_order_free():
    from mergelab.evaluate import Row
    from mergelab.tune import split_rows

    rows = [Row(f"id{i}", "x", 0, ["a", "b"], "multiple_choice") for i in range(40)]
    a = split_rows(Path("task.csv"), rows, 0.25, seed=3)
    b = split_rows(Path("task.csv"), list(reversed(rows)), 0.25, seed=3)
    ids = lambda part: [r.id for r in part]  # noqa: E731
    assert ids(a.search) == ids(b.search) and ids(a.check) == ids(b.check)
    assert len(a.check) == 10 and len(a.search) == 30
    assert not set(ids(a.search)) & set(ids(a.check))
    assert set(ids(a.search)) | set(ids(a.check)) == {r.id for r in rows}
    other = split_rows(Path("task.csv"), rows, 0.25, seed=4)
    assert set(ids(other.check)) != set(ids(a.check))          # the seed matters
    capped = split_rows(Path("task.csv"), rows, 0.5, seed=3, rows_per_task=6)
    assert len(capped.search) == 3 and len(capped.check) == 3
    with pytest.raises(RecipeError, match="at least 2"):
        split_rows(Path("t.csv"), rows[:1], 0.5)


# ------------------------------------------------------------------------------------ search


def _labelled_by_expert(zoo, loras, tmp_path, n=24) -> Path:
    """A validation file whose targets are what the model merged with expert 0 alone predicts."""
    from mergelab.evaluate import EvalOptions
    from mergelab.evaluate.runner import evaluate
    from mergelab.recipe import load_recipe
    from mergelab.merge.inplace import InPlaceMerger

    base = zoo["llama"].base
    rows = _mc_rows(n, seed=1)
    raw = _write_csv(tmp_path / "raw.csv", rows)
    experts = [{"path": str(p), "weight": w} for p, w in zip(loras, (1.0, 0.0, 0.0))]
    recipe = load_recipe(yaml.safe_load(_recipe(tmp_path, base, experts, {"name": "task_arithmetic"}, None,
                                                name="label.yaml").read_text()))
    model, tok = _load(base)
    InPlaceMerger(recipe, model).apply(recipe)
    evaluate(model, [raw], tmp_path / "labels", EvalOptions(), tokenizer=tok)
    preds = [json.loads(line)["prediction"] for line in (tmp_path / "labels/predictions/raw.jsonl").open()]
    for r, p in zip(rows, preds):
        r["target"] = p
    return _write_csv(tmp_path / "val.csv", rows)


def test_tune_favours_the_right_expert_and_the_tuned_recipe_reproduces_it(zoo, strong_loras, tmp_path):
    from mergelab.cli import main
    from mergelab.evaluate import EvalOptions
    from mergelab.evaluate.runner import evaluate
    from mergelab.tune import run_tune
    from mergelab.merge.inplace import InPlaceMerger
    from mergelab.recipe import load_recipe

    _labelled_by_expert(zoo, strong_loras, tmp_path)   # writes val.csv
    experts = [{"path": str(p), "weight": 0.5} for p in strong_loras]
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "task_arithmetic"},
                   {"params": {"weight": {"low": 0.0, "high": 1.0}}, "data": ["val.csv"], "trials": 8,
                    "sampler": "tpe", "seed": 0})
    res = run_tune(path, tmp_path / "out")
    start = next(t for t in res.trials if t.start)
    assert start.values == {"weight[0]": 0.5, "weight[1]": 0.5, "weight[2]": 0.5}
    assert len(res.trials) == 8 and res.stopped_by == "trials"
    assert res.best.search >= start.search
    assert res.best.search > 0.6          # the labels come from expert 0; equal weights score less
    # the winner leans on expert 0
    assert res.best.values["weight[0]"] >= max(res.best.values["weight[1]"], res.best.values["weight[2]"])

    # outputs
    out = tmp_path / "out"
    tuned = yaml.safe_load((out / "recipe.tuned.yaml").read_text())
    assert "tune" not in tuned
    assert [e["weight"] for e in tuned["experts"]] == [res.best.values[f"weight[{i}]"] for i in range(3)]
    with (out / "trials.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in table] == [t.number for t in res.trials]
    assert float(table[res.best.number]["search"]) == pytest.approx(res.best.search)
    report = (out / "report.md").read_text()
    assert f"## Winner: trial {res.best.number}" in report and f"{res.best.check:.4f}" in report
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    search_csv = out / "split/search/val.csv"
    check_csv = out / "split/check/val.csv"
    assert len(list(csv.reader(search_csv.open()))) - 1 == 12

    # `mergelab run` on the tuned recipe writes the merge of the best trial, which scores the same
    assert main(["run", str(out / "recipe.tuned.yaml"), "--out", str(tmp_path / "run"), "--no-rules", "-q"]) == 0
    run_weights = _read_weights(tmp_path / "run/model")
    model, tok = _load(zoo["llama"].base)
    recipe = load_recipe(out / "recipe.tuned.yaml")
    InPlaceMerger(recipe, model).apply(recipe)
    state = model.state_dict()
    for name, w in run_weights.items():
        torch.testing.assert_close(state[name], w, rtol=0, atol=2e-6)
    for part, want in (("search", res.best.search), ("check", res.best.check)):
        csv_file = search_csv if part == "search" else check_csv
        got = evaluate(tmp_path / "run/model", [csv_file], None, EvalOptions())["overall"]["score"]
        assert got == pytest.approx(want, abs=1e-12)


def test_synthetic_objective_finds_the_known_optimum(zoo, strong_loras, tmp_path):
    """The objective is the distance of the merged q_proj/v_proj to a target merge at λ = 1.3."""
    from mergelab.tune import run_tune

    base = zoo["llama"].base
    model, _ = _load(base)
    target_names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    from mergelab.recipe import load_recipe
    from mergelab.merge.inplace import InPlaceMerger

    experts = [{"path": str(strong_loras[0])}, {"path": str(strong_loras[1])}]
    rec = load_recipe({"base": {"path": str(base)}, "experts": experts,
                       "method": {"name": "task_arithmetic", "lambda": 1.3}})
    InPlaceMerger(rec, model).apply(rec)
    target = {n: model.state_dict()[n].clone() for n in target_names}
    calls = []

    def objective(m, part):
        calls.append(part)
        dist = sum(float((m.state_dict()[n] - target[n]).norm()) for n in target_names)
        return -dist, {"synthetic": -dist}

    _write_csv(tmp_path / "val.csv", _mc_rows(4))
    path = _recipe(tmp_path, base, experts, {"name": "task_arithmetic", "lambda": 0.5},
                   {"params": {"lambda": {"low": 0.0, "high": 2.0}}, "data": ["val.csv"], "trials": 25})
    res = run_tune(path, tmp_path / "out", objective=objective, direction="maximize")
    assert abs(res.best.values["lambda"] - 1.3) < 0.05
    assert calls[:2] == ["search", "check"] and len(calls) == 2 * 25


def test_cmaes_sampler_is_seeded_and_improves(zoo, strong_loras, tmp_path):
    """Two CMA-ES searches with one seed propose the same points; the search approaches a target
    merge with weights (0.3, -0.4)."""
    from mergelab.recipe import load_recipe
    from mergelab.tune import run_tune
    from mergelab.merge.inplace import InPlaceMerger

    base = zoo["llama"].base
    model, _ = _load(base)
    experts = [{"path": str(p)} for p in strong_loras[:2]]
    rec = load_recipe({"base": {"path": str(base)}, "experts": [{**e, "weight": w} for e, w in zip(experts, (0.3, -0.4))],
                       "method": {"name": "task_arithmetic"}})
    merger = InPlaceMerger(rec, model)
    merger.apply(rec)
    target = {t.name: t.param.detach().clone() for t in merger.targets}

    def objective(m, part):
        state = m.state_dict()
        return -sum(float((state[n] - w).norm()) for n, w in target.items()), {}

    _write_csv(tmp_path / "val.csv", _mc_rows(4))
    path = _recipe(tmp_path, base, experts, {"name": "task_arithmetic"},
                   {"params": {"weight": {"low": -1.0, "high": 1.0}}, "data": ["val.csv"], "trials": 24,
                    "sampler": "cmaes", "seed": 7, "start_from_recipe": False})
    a = run_tune(path, tmp_path / "a", objective=objective, direction="maximize")
    b = run_tune(path, tmp_path / "b", objective=objective, direction="maximize")
    assert [t.values for t in a.trials] == [t.values for t in b.trials]
    assert a.best.search > max(t.search for t in a.trials[:6])      # better than the first generation
    assert abs(a.best.values["weight[0]"] - 0.3) < 0.2 and abs(a.best.values["weight[1]"] + 0.4) < 0.2


# ---------------------------------------------------------------------------- budgets, storage


def _quick_recipe(zoo, tmp_path, **tune) -> Path:
    _write_csv(tmp_path / "val.csv", _mc_rows(6))
    experts = [{"path": str(p), "weight": 0.5} for p in zoo["llama"].loras[:2]]
    return _recipe(tmp_path, zoo["llama"].base, experts, {"name": "task_arithmetic"},
                   {"params": {"weight": {"low": 0.0, "high": 1.0}}, "data": ["val.csv"], **tune})


def _const(value):
    return lambda m, part: (value, {"t": value})


def test_budgets_stop_the_study(zoo, tmp_path):
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=3)
    res = run_tune(path, tmp_path / "a", objective=_const(0.5), direction="maximize")
    assert res.new_trials == 3 and res.stopped_by == "trials"
    slow = []

    def sleepy(m, part):
        import time

        slow.append(part)
        time.sleep(0.3)
        return 0.5, {}

    res = run_tune(path, tmp_path / "b", trials=1000, time_limit="0.5s", objective=sleepy, direction="maximize")
    assert res.stopped_by == "time_limit" and 1 <= res.new_trials <= 2


def test_ctrl_c_keeps_the_best_so_far(zoo, tmp_path):
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=10)
    n = [0]

    def objective(m, part):
        n[0] += 1
        if n[0] == 5:          # the search part of the third trial
            raise KeyboardInterrupt
        return 0.1 * n[0], {}

    res = run_tune(path, tmp_path / "out", objective=objective, direction="maximize")
    assert res.stopped_by == "interrupted" and len(res.trials) == 2
    assert res.best.number == 1
    assert "trials" in (tmp_path / "out/report.md").read_text()
    assert (tmp_path / "out/recipe.tuned.yaml").is_file()


def test_two_invocations_share_one_sqlite_study(zoo, tmp_path):
    from mergelab.cli import main
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=2)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = run_tune(path, tmp_path / "w1", storage=url, study="s", objective=_const(0.5), direction="maximize")
    second = run_tune(path, tmp_path / "w2", storage=url, study="s", trials=3, objective=_const(0.5),
                      direction="maximize")
    assert [t.number for t in first.trials] == [0, 1]
    assert [t.number for t in second.trials] == [0, 1, 2, 3, 4] and second.new_trials == 3
    points = [tuple(t.values.values()) for t in second.trials]
    assert len(set(points)) == len(points)       # the continued sampler does not replay the first draws
    assert not (tmp_path / "w2/study.db").exists()
    # a study made for another search space is not continued
    path.write_text(path.read_text().replace("high: 1.0", "high: 2.0"))
    assert main(["tune", str(path), "--out", str(tmp_path / "w3"), "--storage", url, "--study", "s"]) == 2


def test_default_study_under_out_is_continued(zoo, tmp_path):
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=2)
    run_tune(path, tmp_path / "out", objective=_const(0.4), direction="maximize")
    res = run_tune(path, tmp_path / "out", objective=_const(0.4), direction="maximize")
    assert len(res.trials) == 4 and (tmp_path / "out/study.db").is_file()


def test_divergence_warning_names_the_threshold(zoo, tmp_path):
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=2, divergence=0.05)
    res = run_tune(path, tmp_path / "out", direction="maximize",
                   objective=lambda m, part: (0.9, {}) if part == "search" else (0.7, {}))
    assert any("divergence threshold 0.05" in w for w in res.warnings)
    assert "divergence threshold 0.05" in (tmp_path / "out/report.md").read_text()


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("tune, expected", [
    ({"params": {"weight": {"low": 1.0, "high": 0.5}}}, r"tune\.params\.weight: low \(1\) must be below high"),
    ({"params": {"weight": {"low": 0, "hgih": 1}}}, r"tune\.params\.weight\.hgih: unknown key"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "trails": 3}, r"tune\.trails: unknown key"),
    ({"params": {"foo": {"low": 0, "high": 1}}}, r"tune\.params\.foo: task_arithmetic has no parameter 'foo'"),
    ({"params": {"lambda": {"low": 0, "high": 1, "per_expert": True}}}, r"tune\.params\.lambda\.per_expert"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "data": ["missing.csv"]}, r"tune\.data\[0\]: file .* does not exist"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "trials": 0}, r"tune\.trials: .*greater than or equal to 1"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "trials": None}, r"give a budget"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "time_limit": "soon"}, r"tune\.time_limit: .*duration"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "sampler": "grid"}, r"tune\.sampler"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "eval": {"batch": 3}}, r"tune\.eval\.batch: unknown key"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "metric": "bleu"}, r"tune\.metric: .*exact_match"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "below_base_penalty": -1},
     r"tune\.below_base_penalty: .*greater than or equal to 0"),
    ({"params": {"weight": {"low": 0, "high": 1}}, "objective": "entropy", "below_base_penalty": 2},
     r"tune\.below_base_penalty: .*works with objective: score"),
])
def test_tune_section_errors_name_the_key_path(zoo, tmp_path, tune, expected):
    from mergelab.tune import run_tune

    _write_csv(tmp_path / "val.csv", _mc_rows(4))
    experts = [{"path": str(p)} for p in zoo["llama"].loras[:2]]
    section = {"data": ["val.csv"], "trials": 2, **tune}
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "task_arithmetic"}, section)
    with pytest.raises(RecipeError, match=expected):
        run_tune(path, tmp_path / "out")


def test_range_checked_against_the_parameter_and_labels_required(zoo, tmp_path):
    from mergelab.cli import main
    from mergelab.tune import run_tune

    _write_csv(tmp_path / "val.csv", _mc_rows(4))
    rows = _mc_rows(4)
    rows[2]["target"] = ""
    _write_csv(tmp_path / "unlabelled.csv", rows)
    experts = [{"path": str(p)} for p in zoo["llama"].loras[:2]]
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "ties"},
                   {"params": {"density": {"low": 0.1, "high": 1.5}}, "data": ["val.csv"], "trials": 2})
    with pytest.raises(RecipeError, match=r"tune\.params\.density\.high: expected a number between 0 and 1"):
        run_tune(path, tmp_path / "out")
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "ties"},
                   {"params": {"density": {"low": 0.1, "high": 0.9}}, "data": ["unlabelled.csv"], "trials": 2})
    with pytest.raises(RecipeError, match=r"(?s)tune\.data\[0\]: .*row 'r2' has no target.*objective: entropy"):
        run_tune(path, tmp_path / "out")
    no_tune = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "ties"}, None, name="plain.yaml")
    assert main(["tune", str(no_tune), "--out", str(tmp_path / "o")]) == 2
    assert main(["tune", str(path), "--out", str(tmp_path / "o"), "--trials", "0"]) == 2


# ------------------------------------------------------------------------------------ entropy


def test_entropy_objective_by_hand(zoo, tmp_path):
    from mergelab.evaluate import EvalOptions
    from mergelab.tune.objective import choice_entropy, mean_entropy, next_token_entropy

    assert choice_entropy([0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert choice_entropy([0.0, -50.0]) == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(torch.tensor([-1.0, -2.0], dtype=torch.float64), 0)
    assert choice_entropy([-1.0, -2.0]) == pytest.approx(float(-(p * p.log()).sum()) / torch.log(torch.tensor(2.0)).item())

    model, tok = _load(zoo["llama"].base)
    prompt = "the quick brown fox"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    lp = torch.log_softmax(logits, -1)
    want = float(-(lp.exp() * lp).sum()) / torch.log(torch.tensor(float(logits.numel()))).item()
    got = next_token_entropy(model, tok, [prompt, "yes no yes no yes no yes"], batch_size=2)
    assert got[0] == pytest.approx(want, rel=1e-6) and 0 < got[1] < 1

    rows = _mc_rows(3)
    for r in rows:
        r["target"] = ""
    f = _write_csv(tmp_path / "u.csv", rows)
    h = mean_entropy(model, tok, f, EvalOptions())
    assert 0.0 < h <= 1.0


def test_entropy_objective_runs_without_labels(zoo, tmp_path):
    from mergelab.tune import run_tune

    rows = _mc_rows(6)
    for r in rows:
        r["target"] = ""
    _write_csv(tmp_path / "val.csv", rows)
    experts = [{"path": str(p)} for p in zoo["llama"].loras[:2]]
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "task_arithmetic"},
                   {"params": {"lambda": {"low": 0.1, "high": 2.0, "layers": 2}}, "objective": "entropy",
                    "data": ["val.csv"], "trials": 3})
    res = run_tune(path, tmp_path / "out")
    assert res.direction == "minimize"
    assert res.best.search == min(t.search for t in res.trials)
    assert all(0 < t.search <= 1 and 0 < t.check <= 1 for t in res.trials)
    tuned = yaml.safe_load((tmp_path / "out/recipe.tuned.yaml").read_text())
    assert tuned["method"]["lambda"] == [res.best.values["lambda#0"], res.best.values["lambda#1"]]


def test_objective_metric_for_generation_rows(zoo, tmp_path):
    """`metric` picks the generation rows' metric of the `score` objective; multiple-choice rows
    count accuracy; rows are weighted equally across the two kinds."""
    from mergelab.evaluate import EvalOptions
    from mergelab.evaluate.runner import evaluate
    from mergelab.evaluate.loading import load_tokenizer
    from mergelab.testing import load_model
    from mergelab.tune.objective import Objective, file_score

    fs = {"score": 0.55, "multiple_choice": {"scored": 2, "accuracy": 0.5},
          "generation": {"scored": 3, "exact_match": 1 / 3, "rouge1": 0.6, "rouge2": 0.2, "rougeL": 0.6}}
    assert file_score(fs) == 0.55
    assert file_score(fs, "exact_match") == pytest.approx((0.5 * 2 + 1 / 3 * 3) / 5)
    assert file_score(fs, "rouge2") == pytest.approx((0.5 * 2 + 0.2 * 3) / 5)

    base = zoo["llama"].base
    model, tok = load_model(base), load_tokenizer(base)
    opts = EvalOptions(max_new_tokens=3)
    # generation targets: what the model itself answers for half the rows (exact match 1), junk for the rest
    rows = [{"id": f"g{i}", "input": f"count {i} {i + 1}"} for i in range(4)]
    path = tmp_path / "gen.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for r in rows:
            w.writerow([r["id"], r["input"], "x", "", "generation"])
    evaluate(model, [path], tmp_path / "own", opts, tokenizer=tok)
    preds = [json.loads(line)["prediction"] for line in (tmp_path / "own/predictions/gen.jsonl").open()]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i, (r, p) in enumerate(zip(rows, preds)):
            w.writerow([r["id"], r["input"], p if i % 2 == 0 else "zzz qqq", "", "generation"])
    em = Objective("score", {"search": [path]}, opts, tok, metric="exact_match")(model, "search")[0]
    rl = Objective("score", {"search": [path]}, opts, tok)(model, "search")[0]
    assert em == pytest.approx(0.5)
    assert rl == pytest.approx(evaluate(model, [path], None, opts, tokenizer=tok)["overall"]["score"])


# ------------------------------------------------------------------ the base, and tasks the search cannot see


def _scripted(calls: list[tuple[dict, dict]]):
    """An objective that answers the n-th (search, check) pair of calls with ``calls[n]``:
    per-task values, their mean the objective's value."""
    seen = []

    def objective(m, part):
        search, check = calls[len(seen) // 2]
        seen.append(part)
        tasks = search if part == "search" else check
        return sum(tasks.values()) / len(tasks), dict(tasks)

    return objective


def test_below_base_penalty_by_hand(zoo, tmp_path):
    """value = mean over tasks − penalty × Σ max(0, base − merge); the base is scored first, on the
    unmerged model; the penalty turns the winner from the trial that gains on average but drops a
    task below the base to the one that leaves no task below it."""
    from mergelab.recipe import read_recipe
    from mergelab.tune import run_tune
    from mergelab.tune.config import fingerprint

    base = ({"a": 0.5, "b": 0.6}, {"a": 0.5, "b": 0.5})
    gains_on_average = ({"a": 0.9, "b": 0.4}, {"a": 0.8, "b": 0.5})    # search mean 0.65, b 0.2 below the base
    no_task_below = ({"a": 0.6, "b": 0.6}, {"a": 0.6, "b": 0.45})      # search mean 0.60, check b 0.05 below

    plain = _quick_recipe(zoo, tmp_path, trials=2)
    res = run_tune(plain, tmp_path / "plain", objective=_scripted([gains_on_average, no_task_below]),
                   direction="maximize")
    assert [t.search for t in res.trials] == pytest.approx([0.65, 0.60]) and res.best.number == 0
    assert res.base_tasks == {} and "base (search)" not in (tmp_path / "plain/report.md").read_text()

    (tmp_path / "p").mkdir()
    path = _quick_recipe(zoo, tmp_path / "p", trials=2, below_base_penalty=2.0)
    res = run_tune(path, tmp_path / "out", objective=_scripted([base, gains_on_average, no_task_below]),
                   direction="maximize")
    assert res.base_tasks == {"search": base[0], "check": base[1]} and res.below_base_penalty == 2.0
    first, second = res.trials
    assert first.search == pytest.approx(0.65 - 2.0 * 0.2)       # 0.25
    assert first.check == pytest.approx(0.65 - 2.0 * 0.0)        # check: b equals the base
    assert second.search == pytest.approx(0.60 - 2.0 * 0.0)
    assert second.check == pytest.approx(0.525 - 2.0 * 0.05)     # 0.425
    assert res.best.number == 1
    assert first.search_tasks == gains_on_average[0]             # the per-task values stay the real scores
    report = (tmp_path / "out/report.md").read_text()
    assert "score − 2 × Σ max(0, base − merge) over tasks (below_base_penalty)" in report
    assert "| task | search | base (search) | check | base (check) | vs base |" in report
    assert "| b | 0.6000 | 0.6000 | 0.4500 | 0.5000 | below base (check) |" in report
    assert "below base" in (tmp_path / "out/report.html").read_text()
    # a study with the penalty is another study than one without (its values differ)
    with_p, without = read_recipe(path), read_recipe(plain)
    assert fingerprint(with_p.data, with_p.tune) != fingerprint(without.data, without.tune)


def test_below_base_penalty_scores_the_unmerged_base_with_the_real_objective(zoo, tmp_path):
    from mergelab.evaluate.runner import evaluate
    from mergelab.tune import run_tune
    from mergelab.tune.study import _eval_options

    path = _quick_recipe(zoo, tmp_path, trials=2, below_base_penalty=1.5)
    res = run_tune(path, tmp_path / "out")
    model, tok = _load(zoo["llama"].base)
    from mergelab.recipe import read_recipe

    doc = read_recipe(path)
    options = _eval_options(doc.tune, doc.data, doc.root, "auto")
    for part in ("search", "check"):
        want = evaluate(model, [tmp_path / f"out/split/{part}/val.csv"], None, options, tokenizer=tok)
        assert res.base_tasks[part] == {"val": pytest.approx(want["files"]["val.csv"]["score"], abs=1e-12)}
    for t in res.trials:
        merged = t.search_tasks["val"]
        assert t.search == pytest.approx(merged - 1.5 * max(0.0, res.base_tasks["search"]["val"] - merged))


def test_a_task_that_scores_the_same_in_every_trial_is_named(zoo, tmp_path):
    from mergelab.tune import run_tune

    path = _quick_recipe(zoo, tmp_path, trials=3)
    n = [0]

    def objective(m, part):
        n[0] += 1
        tasks = {"moves": 0.1 * n[0], "stuck": 0.0, "perfect": 1.0}
        return sum(tasks.values()) / 3, tasks

    res = run_tune(path, tmp_path / "out", objective=objective, direction="maximize")
    assert res.constant_tasks == {"stuck": 0.0, "perfect": 1.0}
    stuck = next(w for w in res.warnings if "'stuck'" in w)
    assert "scored 0.0000 on the search part in every one of the 3 trials" in stuck
    assert "could not see it" in stuck and "stop" in stuck and "max_new_tokens" in stuck and "tune.metric" in stuck
    assert any("'perfect'" in w and "already scores it perfectly" in w for w in res.warnings)
    assert not any("'moves'" in w for w in res.warnings)
    report = (tmp_path / "out/report.md").read_text()
    assert "## Tasks the search could not see" in report and "| stuck | 0.0000 |" in report
    assert "'stuck' scored 0.0000" in report
    assert 'id="constanttasks"' in (tmp_path / "out/report.html").read_text()
    # one trial tells nothing
    res = run_tune(_quick_recipe(zoo, tmp_path, trials=1), tmp_path / "one", objective=_const(0.0),
                   direction="maximize")
    assert res.constant_tasks == {} and not any("could not see" in w for w in res.warnings)


def test_tune_warns_about_a_generation_task_whose_outputs_never_match(zoo, tmp_path, capsys, monkeypatch):
    """End to end on the tiny Llama: a generation task judged by exact match whose targets the
    model never produces scores 0 in every trial; `mergelab tune` names it, on any terminal width."""
    from mergelab.cli import main

    monkeypatch.setenv("COLUMNS", "40")
    _write_csv(tmp_path / "mc.csv", _mc_rows(6))
    with (tmp_path / "gen.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(4):
            w.writerow([f"g{i}", f"count {i} {i + 1}", "zzz qqq vvv", "", "generation"])
    experts = [{"path": str(p), "weight": 0.5} for p in zoo["llama"].loras[:2]]
    path = _recipe(tmp_path, zoo["llama"].base, experts, {"name": "task_arithmetic"},
                   {"params": {"weight": {"low": 0.0, "high": 1.0}}, "data": ["mc.csv", "gen.csv"],
                    "metric": "exact_match", "trials": 2, "eval": {"max_new_tokens": 3}})
    assert main(["tune", str(path), "--out", str(tmp_path / "out"), "-q"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: task 'gen' scored 0.0000 on the search part in every one of the 2 trials" in err
    assert "the search could not see it" in err and "stop strings" in err
    assert "| gen | 0.0000 |" in (tmp_path / "out/report.md").read_text()


def test_the_recipe_eval_section_of_run_gives_tune_its_options_without_compare_base(tmp_path):
    """`eval.compare_base` belongs to `mergelab run`; the trials take the other options."""
    from mergelab.recipe.sections import TuneSection
    from mergelab.tune.study import _eval_options

    _write_csv(tmp_path / "val.csv", _mc_rows(4))
    section = TuneSection.model_validate({"params": {"weight": {"low": 0, "high": 1}}, "data": [tmp_path / "val.csv"]})
    options = _eval_options(section, {"eval": {"data": ["x.csv"], "compare_base": True, "batch_size": 3}}, tmp_path,
                            "auto")
    assert options.batch_size == 3
