"""mergelab tune with optimizer: gradient (AdaMerging-style): the gradient, the descent, the outputs."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.recipe.sections import TuneError

WORDS = "the quick brown fox jumps over lazy dog yes no true false one two three".split()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_rows(path: Path, n: int, *, mc: int = 0, seed: int = 0) -> Path:
    """``n`` unlabelled rows: the first ``mc`` multiple choice, the rest generation."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(5))
            if i < mc:
                w.writerow([f"r{i}", text, "", json.dumps(["yes", "no", "true"]), "multiple_choice"])
            else:
                w.writerow([f"r{i}", text, "", "", "generation"])
    return path


@pytest.fixture(scope="module")
def loras(zoo, tmp_path_factory):
    """Two LoRA adapters of the llama fixture base, strong enough to move its predictions."""
    from mergelab.testing import make_lora

    root = tmp_path_factory.mktemp("grad_loras")
    base = zoo["llama"].base
    return [make_lora(base, root / "l0", seed=7, r=4, alpha=8, std=0.3, target_modules=["q_proj", "v_proj", "up_proj"]),
            make_lora(base, root / "l1", seed=8, r=2, alpha=4, std=0.3, target_modules=["o_proj", "down_proj"])]


def _recipe(tmp: Path, base, experts, method, tune) -> Path:
    data = {"base": {"path": str(base)}, "experts": [{"path": str(e)} for e in experts], "method": method,
            "tune": tune}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _linear_merge(recipe_path: Path, dtype=torch.float32):
    """(LinearMerge, tokenizer, options) of a recipe file with a tune section, on a fresh model."""
    from mergelab.evaluate import EvalOptions
    from mergelab.evaluate.loading import load_tokenizer
    from mergelab.merge.inplace import InPlaceMerger
    from mergelab.recipe import load_recipe, read_recipe
    from mergelab.testing import load_model
    from mergelab.tune import SearchSpace
    from mergelab.tune.gradient import LinearMerge
    from mergelab.tune.study import default_gradient_params

    doc = read_recipe(recipe_path)
    recipe = load_recipe(doc.data, base_dir=doc.root)
    section = doc.tune
    if section.params is None:
        section = section.model_copy(update={"params": default_gradient_params(recipe)})
    space = SearchSpace(doc.data, section)
    model = load_model(recipe.base.resolve(), dtype=dtype)
    merger = InPlaceMerger(recipe, model)
    return LinearMerge(space, doc.root, merger, model), load_tokenizer(recipe.base.resolve()), EvalOptions(batch_size=2)


def test_gradient_equals_finite_differences(zoo, loras, tmp_path):
    """d entropy / d λ from autograd equals a central finite difference, for generation rows and
    multiple-choice rows (a float64 model; its RMSNorm and the choice log-probabilities still run in
    float32, hence the step 1e-3 and the tolerances)."""
    from mergelab.evaluate import read_competition_csv
    from mergelab.tune.gradient import entropy_loss

    gen = _write_rows(tmp_path / "gen.csv", 3)
    mc = _write_rows(tmp_path / "mc.csv", 2, mc=2, seed=1)
    path = _recipe(tmp_path, zoo["llama"].base, loras, {"name": "task_arithmetic", "lambda": 0.8},
                   {"optimizer": "gradient", "data": [str(gen), str(mc)],
                    "params": {"weight": {"low": 0.0, "high": 1.0, "layers": 2}}})
    merge, tok, opts = _linear_merge(path, torch.float64)
    assert merge.names == ["weight[0]#0", "weight[0]#1", "weight[1]#0", "weight[1]#1"]
    at = torch.tensor([0.3, 0.7, 0.5, 0.2], dtype=torch.float64)
    for files, rtol in (([gen], 2e-3), ([mc], 2e-2)):
        eps = 1e-3
        tasks = [read_competition_csv(f) for f in files]
        lam = at.clone().requires_grad_(True)
        entropy_loss(merge, tok, tasks, opts, lam)
        grad = lam.grad.clone()
        fd = torch.zeros_like(at)
        for d in range(len(at)):
            e = torch.zeros_like(at)
            e[d] = eps
            fd[d] = (entropy_loss(merge, tok, tasks, opts, at + e, backward=False)
                     - entropy_loss(merge, tok, tasks, opts, at - e, backward=False)) / (2 * eps)
        assert grad.abs().max() > 1e-4            # the coefficients do move the entropy
        torch.testing.assert_close(grad, fd, rtol=rtol, atol=2e-5)


def _tune(tmp_path, zoo, experts, method, name="out", **tune):
    from mergelab.tune import run_tune

    data = _write_rows(tmp_path / "val.csv", 8, mc=2)
    spec = {"optimizer": "gradient", "data": [str(data)], "check_fraction": 0.25, "steps": 6,
            "learning_rate": 0.1, "eval": {"batch_size": 4}, **tune}
    path = _recipe(tmp_path, zoo["llama"].base, experts, method, spec)
    return path, run_tune(path, tmp_path / name)


def test_loss_falls_and_outputs(zoo, loras, tmp_path):
    """Layer-wise AdaMerging by default: one weight per expert per layer; the entropy falls; the
    report has the trajectory, the start and final points on both parts, and the check split."""
    path, res = _tune(tmp_path, zoo, loras, {"name": "task_arithmetic", "lambda": 1.0})
    assert res.optimizer == "gradient" and res.direction == "minimize" and res.stopped_by == "steps"
    assert len(res.trajectory) == 6 and res.trajectory[-1] < res.trajectory[0]
    start, final = res.trials
    assert start.start and final is res.best and final.number == 6
    assert final.search < start.search
    assert sorted(final.values) == ["weight[0]#0", "weight[0]#1", "weight[1]#0", "weight[1]#1"]  # 2 layers
    assert all(0.0 <= v <= 1.0 for v in final.values.values())
    out = tmp_path / "out"
    tuned = yaml.safe_load((out / "recipe.tuned.yaml").read_text())
    assert "tune" not in tuned
    assert tuned["experts"][0]["weight"] == [final.values["weight[0]#0"], final.values["weight[0]#1"]]
    report = (out / "report.md").read_text()
    assert "optimizer gradient" in report and "## Loss per step" in report
    assert f"| 5 | {res.trajectory[5]:.6f} |" in report
    assert 'id="losschart"' in (out / "report.html").read_text()
    assert (out / "split/search/val.csv").is_file() and (out / "split/check/val.csv").is_file()
    assert res.split_sizes == {"val": (6, 2)}


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_tuned_recipe_merges_to_the_optimisers_model(zoo, loras, tmp_path, kind):
    """The engine's merge of recipe.tuned.yaml gives the logits of the weights the optimiser saw."""
    from mergelab.merge import merge
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model

    experts = loras if kind == "lora" else zoo["llama"].experts[:2]
    method = {"name": "task_arithmetic", "lambda": 0.9} if kind == "lora" else {"name": "linear"}
    params = ({"weight": {"low": 0.0, "high": 1.0, "layers": 2}, "lambda": {"low": 0.5, "high": 1.5}}
              if kind == "lora" else {"weight": {"low": 0.1, "high": 1.0, "groups": ["self_attn", "mlp"]}})
    path, res = _tune(tmp_path, zoo, experts, method, steps=3, params=params)
    assert res.trajectory[-1] < res.trajectory[0]
    tuned = yaml.safe_load((tmp_path / "out/recipe.tuned.yaml").read_text())
    merge(load_recipe(tuned, base_dir=tmp_path), tmp_path / "merged", progress=False)
    merged = load_model(tmp_path / "merged")

    lm, tok, _ = _linear_merge(path)
    ids = torch.tensor([tok("the quick brown fox jumps")["input_ids"]])
    with torch.no_grad():
        seen = lm.merged_model(lm.vector(res.best.values))(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = lm.model(input_ids=ids).logits
    assert not torch.allclose(seen, base, atol=1e-3)     # the merge does change the model
    torch.testing.assert_close(got, seen, rtol=1e-5, atol=1e-5)


def test_refuses_non_linear_methods(zoo, loras, tmp_path):
    with pytest.raises(TuneError, match=r"method 'ties' is not such a merge \(valid methods: task_arithmetic, linear\)"):
        _tune(tmp_path, zoo, loras, {"name": "ties", "density": 0.5},
              params={"weight": {"low": 0.0, "high": 1.0}})
    with pytest.raises(TuneError, match=r"objective 'score' has no gradient"):
        _tune(tmp_path, zoo, loras, {"name": "task_arithmetic"}, objective="score")
    with pytest.raises(TuneError, match=r"steps, learning_rate: only for optimizer: gradient"):
        _tune(tmp_path, zoo, loras, {"name": "task_arithmetic"}, optimizer="optuna",
              params={"lambda": {"low": 0.1, "high": 1.0}})


def test_same_seed_same_tuned_recipe(zoo, loras, tmp_path, capsys):
    """The same recipe and seed give the same tuned recipe, also through the CLI."""
    from mergelab.cli import main

    method = {"name": "task_arithmetic", "lambda": 1.0}
    path, a = _tune(tmp_path, zoo, loras, method, name="a", steps=3, seed=3)
    assert main(["tune", str(path), "--out", str(tmp_path / "b")]) == 0
    assert "after 3 gradient step(s)" in capsys.readouterr().err
    assert (tmp_path / "a/recipe.tuned.yaml").read_bytes() == (tmp_path / "b/recipe.tuned.yaml").read_bytes()
    # the search's own options are refused, not silently ignored
    assert main(["tune", str(path), "--out", str(tmp_path / "c"), "--trials", "5", "--sampler", "cmaes"]) == 2
    err = capsys.readouterr().err
    assert "--trials, --sampler: options of the optuna search" in " ".join(err.split()) and "tune.steps" in err
    assert not (tmp_path / "c").exists()
