"""`mergelab run` / `mergelab reproduce`: manifests, stage skipping, byte-identical reruns."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergelab import htmlpage
from mergelab.cli import main
from mergelab.errors import RecipeError
from mergelab.run.pipeline import OutputsDifferError, reproduce, run_recipe
from mergelab.testing import write_mixed_csv, tree_bytes


def write_recipe(folder: Path, base: Path, experts: list[Path], **extra) -> Path:
    recipe = {
        "base": {"path": str(base)},
        "experts": [{"path": str(e), "weight": w} for e, w in zip(experts, (0.6, 0.4, 0.3))],
        "method": {"name": "dare_ties", "density": 0.5},
        "seed": 7,
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path



def test_two_runs_give_identical_bytes_and_a_full_manifest(llama, tmp_path):
    base, experts = llama
    recipe = write_recipe(tmp_path, base, experts)
    a = run_recipe(recipe, tmp_path / "a", rules=False)
    b = run_recipe(recipe, tmp_path / "b", rules=False)
    assert tree_bytes(tmp_path / "a" / "model") == tree_bytes(tmp_path / "b" / "model")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m == a.manifest | {"created": m["created"]}
    assert m["outputs"] == b.manifest["outputs"] and m["outputs"]
    assert all(k.startswith("model/") for k in m["outputs"])
    # every output file is hashed, and the hashes are right
    import hashlib

    for name, digest in m["outputs"].items():
        assert hashlib.sha256((tmp_path / "a" / name).read_bytes()).hexdigest() == digest
    # inputs: every weight file of base and experts, by sha256
    roles = {r["role"]: r for r in m["models"]}
    assert set(roles) == {"base", "expert 1", "expert 2"}
    weight_files = {p.name for p in base.glob("*.safetensors")}
    assert weight_files <= set(roles["base"]["files"])
    assert m["seed"] == 7 and m["recipe"]["method"]["name"] == "dare_ties"
    assert {"torch", "transformers", "mergelab", "python"} <= set(m["versions"])
    assert "merge" in m["timings"]


def test_rerun_skips_up_to_date_stages_and_redoes_changed_ones(llama, tmp_path):
    base, experts = llama
    recipe = write_recipe(tmp_path, base, experts)
    out = tmp_path / "run"
    run_recipe(recipe, out, rules=False)
    again = run_recipe(recipe, out, rules=False)
    assert {s.name: s.status for s in again.stages}["merge"] == "skipped"
    # a damaged output is noticed and rebuilt
    shard = sorted((out / "model").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    third = run_recipe(recipe, out, rules=False)
    assert {s.name: s.status for s in third.stages}["merge"] == "ran"
    assert third.manifest["outputs"] == again.manifest["outputs"]
    # a changed recipe parameter re-merges
    data = yaml.safe_load(recipe.read_text())
    data["method"]["density"] = 0.7
    recipe.write_text(yaml.safe_dump(data))
    fourth = run_recipe(recipe, out, rules=False)
    assert {s.name: s.status for s in fourth.stages}["merge"] == "ran"
    assert fourth.manifest["outputs"] != again.manifest["outputs"]


def test_reproduce_matches_then_names_a_changed_input(llama, tmp_path, capsys):
    base, experts = llama
    recipe = write_recipe(tmp_path, base, experts)
    run_recipe(recipe, tmp_path / "first", rules=False)
    assert main(["reproduce", str(tmp_path / "first" / "manifest.json"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    assert "match the manifest" in capsys.readouterr().err

    # change one expert's weights a little
    shard = sorted(experts[1].glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(shard), metadata={"format": "pt"})

    with pytest.raises(OutputsDifferError) as err:
        reproduce(tmp_path / "first" / "manifest.json", tmp_path / "third")
    msg = str(err.value)
    assert f"input changed: expert 2 {shard.name}" in msg
    assert "differs: model/" in msg
    assert main(["reproduce", str(tmp_path / "first"), "--out", str(tmp_path / "fourth"), "--quiet"]) == 1


def test_rules_are_checked_by_default_and_local_models_fail_them(llama, tmp_path, capsys):
    base, experts = llama
    recipe = write_recipe(tmp_path, base, experts)
    code = main(["run", str(recipe), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "competition rules" in err and "--no-rules" in err
    assert not (tmp_path / "r" / "model").exists()


def test_hub_models_are_pinned_to_their_commit_in_the_manifest(zoo, tmp_path, monkeypatch):
    from mergelab.testing.hubsim import Commit, HubSim, Repo, files_from_folder

    fz = zoo["llama"]
    repos = [Repo("org/base", [Commit(files_from_folder(fz.base), date="2024-03-01T00:00:00Z")]),
             Repo("org/expert", [Commit(files_from_folder(fz.experts[0]), date="2024-04-01T00:00:00Z")])]
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "5")
    recipe = {"base": {"model": "org/base", "revision": "main"},
              "experts": [{"model": "org/expert", "revision": "main", "weight": 1.0},
                          {"path": str(fz.experts[1]), "weight": 0.5}],
              "method": {"name": "task_arithmetic"}}
    with HubSim(repos) as hub, hub.environ(cache_dir=tmp_path / "cache"):
        result = run_recipe(recipe, tmp_path / "hubrun", rules=False)
    m = result.manifest
    base_sha = repos[0].commits[0].sha
    assert m["recipe"]["base"] == {"model": "org/base", "revision": base_sha}
    roles = {r["role"]: r for r in m["models"]}
    assert roles["base"]["commit_sha"] == base_sha and roles["base"]["source"] == "hub"
    assert roles["expert 2"]["source"] == "local"
    assert (tmp_path / "hubrun" / "model" / "config.json").is_file()


def test_a_non_run_folder_is_refused(llama, tmp_path):
    base, experts = llama
    recipe = write_recipe(tmp_path, base, experts)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    from mergelab.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="not a mergelab run folder"):
        run_recipe(recipe, tmp_path / "busy", rules=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("section, message", [
    ({"batch_size": 4}, "eval.data"),
    ({"data": ["missing.csv"]}, "eval.data[0]: file"),
    ({"data": ["t.csv"], "batchsize": 4}, "eval.batchsize: unknown key"),
    ({"data": ["t.csv"], "batch_size": 0}, "eval.batch_size"),
    ({"data": ["t.csv"], "compare_base": "yes"}, "eval.compare_base: expected true or false, got 'yes'"),
])
def test_eval_section_errors_name_the_key(llama, tmp_path, section, message):
    base, experts = llama
    (tmp_path / "t.csv").write_text("id,input,target,answer_choices,eval_type\n0,hi,yes,,generation\n")
    recipe = write_recipe(tmp_path, base, experts, eval=section)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_recipe(recipe, tmp_path / "r", rules=False)
    assert not (tmp_path / "r" / "model").exists()


def test_run_with_eval_writes_submissions_and_reproduces_byte_for_byte(llama, tmp_path):
    base, experts = llama
    (tmp_path / "mc.csv").write_text(
        "id,input,target,answer_choices,eval_type\n"
        "a,\"Question: two plus three?\nAnswer:\",1,\"['four', 'five']\",multiple_choice\n"
        "b,Sentiment: I loved it. Label:,0,\"['positive', 'negative']\",multiple_choice\n"
        "c,Dates: 2024-05-31 is,the thirty-first of May,,generation\n")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["mc.csv"], "max_new_tokens": 4,
                                                         "batch_size": 2})
    first = run_recipe(recipe, tmp_path / "one", rules=False)
    sub = (tmp_path / "one" / "eval" / "mc.csv").read_text().splitlines()
    assert sub[0] == "id,prediction,dummy_field" and [r.split(",")[0] for r in sub[1:]] == ["a", "b", "c"]
    assert "eval/scores.json" in first.manifest["outputs"]
    assert not any(k.endswith("timing.json") for k in first.manifest["outputs"])
    again = run_recipe(recipe, tmp_path / "one", rules=False)
    assert {s.name: s.status for s in again.stages} == {"resolve": "ran", "rules": "off", "merge": "skipped",
                                                       "eval": "skipped"}
    second = reproduce(tmp_path / "one" / "manifest.json", tmp_path / "two")
    assert second.manifest["outputs"] == first.manifest["outputs"]


def test_a_tiny_budget_ends_evaluation_early_with_a_complete_submission(llama, tmp_path, capsys):
    """--force past a plan that does not fit: the deadline passes before evaluation, so every
    row gets the documented fallback; the submission still has every row, and the run says so."""
    import csv

    from mergelab.evaluate.runner import FALLBACK_CHOICE, FALLBACK_TEXT

    base, experts = llama
    write_mixed_csv(tmp_path / "t.csv", 12, choice_input="Is {i} even?", choices=["yes", "no"],
                    gen_input="Count to {i}", gen_target="1 2")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["t.csv"], "max_new_tokens": 4})
    result = run_recipe(recipe, tmp_path / "r", rules=False, budget=0.01, hardware="cpu", force=True)
    stages = {s.name: s for s in result.stages}
    assert stages["eval"].status == "partial" and "DEADLINE: 12 of 12 rows not reached" in stages["eval"].detail
    with open(tmp_path / "r" / "eval" / "t.csv", newline="") as fh:
        sub = list(csv.DictReader(fh))
    assert [r["id"] for r in sub] == [str(i) for i in range(12)]
    assert {r["prediction"] for r in sub} == {str(FALLBACK_CHOICE), FALLBACK_TEXT}
    b = result.manifest["budget"]
    assert b["rows_not_reached"] == 12 and b["eval_complete"] is False and b["over_budget"] is True
    assert b["planned_s"] > b["budget_s"] == 0.01 and set(b["planned"]) == {"merge", "eval"}
    assert any("evaluation hit the deadline" in w for w in result.manifest["warnings"])
    # an incomplete evaluation is redone by a rerun without a budget
    again = run_recipe(recipe, tmp_path / "r", rules=False)
    assert {s.name: s.status for s in again.stages}["eval"] == "ran"
    assert again.manifest["stages"]["eval"]["complete"] is True and "budget" not in again.manifest
    # the CLI prints it loudly
    assert main(["run", str(recipe), "--out", str(tmp_path / "cli"), "--no-rules", "--quiet", "--budget", "0.01s",
                 "--hardware", "cpu", "--force"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "not reached" in err and "budget 0.0 min on the cpu" in err


def test_a_budget_that_fits_runs_everything(llama, tmp_path):
    base, experts = llama
    (tmp_path / "t.csv").write_text("id,input,target,answer_choices,eval_type\n0,hi,yes,,generation\n")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["t.csv"], "max_new_tokens": 2})
    result = run_recipe(recipe, tmp_path / "r", rules=False, budget="60m")   # planned on the a6000
    b = result.manifest["budget"]
    assert b["hardware"] == "a6000" and b["plan_verdict"].startswith("fits") and not b["forced"]
    assert b["eval_complete"] and b["rows_not_reached"] == 0 and b["used_s"] < 3600


def test_a_run_interrupted_in_evaluation_resumes_after_the_merge(llama, tmp_path, monkeypatch):
    """Ctrl-C during evaluation: the merge is already recorded in the manifest (finished: false),
    the rerun skips it and evaluates; a killed run's stale temporary folder is removed; the
    unfinished manifest cannot be reproduced."""
    import mergelab.run.pipeline as pipeline
    from mergelab.errors import ReproducibilityError

    base, experts = llama
    (tmp_path / "mc.csv").write_text(
        "id,input,target,answer_choices,eval_type\n"
        "a,Sentiment: I loved it. Label:,0,\"['positive', 'negative']\",multiple_choice\n")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["mc.csv"], "batch_size": 2})
    real = pipeline.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "run", rules=False)
    partial = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert partial["finished"] is False and set(partial["stages"]) == {"merge"}
    with pytest.raises(ReproducibilityError, match="did not finish"):
        reproduce(tmp_path / "run" / "manifest.json", tmp_path / "again")
    stale = tmp_path / "run" / ".eval.partial-999999999"   # a pid that cannot exist
    stale.mkdir()
    monkeypatch.setattr(pipeline, "evaluate", real)
    done = run_recipe(recipe, tmp_path / "run", rules=False)
    assert {s.name: s.status for s in done.stages}["merge"] == "skipped"
    assert {s.name: s.status for s in done.stages}["eval"] == "ran"
    assert "finished" not in done.manifest and not stale.exists()
    assert (tmp_path / "run" / "eval" / "mc.csv").is_file()


def test_an_interrupted_reproduction_resumes_in_its_folder(llama, tmp_path, monkeypatch):
    """reproduce stopped during evaluation, then run again into the same folder: it resumes after
    the merge and compares as usual; a folder holding anything else is still refused."""
    import mergelab.run.pipeline as pipeline
    from mergelab.errors import OutputExistsError

    base, experts = llama
    (tmp_path / "mc.csv").write_text(
        "id,input,target,answer_choices,eval_type\n"
        "a,Sentiment: I loved it. Label:,0,\"['positive', 'negative']\",multiple_choice\n")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["mc.csv"], "batch_size": 2})
    first = run_recipe(recipe, tmp_path / "one", rules=False)
    real = pipeline.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce(tmp_path / "one" / "manifest.json", tmp_path / "two")
    monkeypatch.setattr(pipeline, "evaluate", real)
    again = reproduce(tmp_path / "one" / "manifest.json", tmp_path / "two")
    assert {s.name: s.status for s in again.stages}["merge"] == "skipped"
    assert again.manifest["outputs"] == first.manifest["outputs"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        reproduce(tmp_path / "one" / "manifest.json", tmp_path / "other")


# ------------------------------------------------------------------ the merge against the base


def _mc_file(path: Path, n: int, targets: list[int] | None = None) -> Path:
    import csv

    words = ["red", "green", "blue", "cold", "warm", "north", "south"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n):
            w.writerow([f"r{i}", f"Which word fits: {words[i % 7]} {words[(3 * i) % 7]} {i}?",
                        0 if targets is None else targets[i], json.dumps(["a", "b", "c", "d"]),
                        "multiple_choice"])
    return path


def _predictions(folder: Path, stem: str) -> list[int]:
    return [int(json.loads(line)["prediction"]) for line in (folder / "predictions" / f"{stem}.jsonl").open()]


def test_compare_base_flags_a_task_the_merge_leaves_below_the_base(llama, tmp_path, capsys, monkeypatch):
    """Two labelled files: `base_wins` labelled with the base's own answers (base 1.0, the merge
    less), `merge_wins` with the merge's. The run scores the base too, names base_wins below it in
    the manifest, the warnings, the JSON, the terminal table and report.html, and reruns skip it."""
    from mergelab.evaluate import EvalOptions
    from mergelab.evaluate.runner import evaluate

    monkeypatch.setenv("COLUMNS", "40")
    base, experts = llama
    extra = {"method": {"name": "task_arithmetic", "lambda": 40.0}}   # far from the base: other answers
    # the answers of the base and of the merge on the same rows
    _mc_file(tmp_path / "probe.csv", 12)
    probe = write_recipe(tmp_path, base, experts, **extra, eval={"data": ["probe.csv"]})
    run_recipe(probe, tmp_path / "probe-run", rules=False)
    merge_answers = _predictions(tmp_path / "probe-run" / "eval", "probe")
    evaluate(base, [tmp_path / "probe.csv"], tmp_path / "probe-base", EvalOptions())
    base_answers = _predictions(tmp_path / "probe-base", "probe")
    assert merge_answers != base_answers
    _mc_file(tmp_path / "base_wins.csv", 12, base_answers)
    _mc_file(tmp_path / "merge_wins.csv", 12, merge_answers)
    agree = sum(a == b for a, b in zip(merge_answers, base_answers)) / 12

    recipe = write_recipe(tmp_path, base, experts, **extra,
                          eval={"data": ["base_wins.csv", "merge_wins.csv"], "compare_base": True})
    result = run_recipe(recipe, tmp_path / "run", rules=False, budget="1h", hardware="cpu")
    m = result.manifest
    assert m["base_scores"] == {"base_wins": 1.0, "merge_wins": pytest.approx(agree)}
    assert m["below_base"] == ["base_wins"]
    scores = json.loads((tmp_path / "run" / "eval" / "scores.json").read_text())["files"]
    assert scores["base_wins.csv"]["score"] == pytest.approx(agree) and scores["merge_wins.csv"]["score"] == 1.0
    assert {s.name: s.status for s in result.stages}["base_eval"] == "ran"
    assert "base_eval" in m["budget"]["planned"]          # the plan counts the base's evaluation
    assert any(f"the merge scores below the base model on base_wins ({agree:.4f} < 1.0000): merging is worse "
               "there than not merging at all" in w and "below_base_penalty" in w for w in m["warnings"])
    assert m["recipe"]["eval"]["compare_base"] is True
    page = (tmp_path / "run" / "report.html").read_text()
    row = next(r for r in re.findall(r"<tr[^>]*>.*?</tr>", page) if "<td>base_wins</td>" in r)
    assert row.startswith('<tr class="bad">')
    assert f'<td class="num bad" title="the merge scores below the base model here">{agree - 1.0:.4f} ▼ below base' \
        in row.replace(htmlpage.fmt_number(agree - 1.0), f"{agree - 1.0:.4f}")
    assert f"▼ below the base model on base_wins ({agree:.4f} &lt; 1.0000)" in page

    # a rerun: nothing to redo, the comparison still made
    again = run_recipe(recipe, tmp_path / "run", rules=False)
    assert {s.name: s.status for s in again.stages} == {"resolve": "ran", "rules": "off", "merge": "skipped",
                                                       "eval": "skipped", "base_eval": "skipped"}
    assert again.manifest["below_base"] == ["base_wins"] and again.manifest["base_scores"] == m["base_scores"]

    # the command: the table of merge vs base and the warning on stderr, the flag in the JSON
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "cli"), "--no-rules", "-q", "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["below_base"] == ["base_wins"] and doc["base_scores"]["base_wins"] == 1.0
    table = [line for line in err.splitlines() if line.strip().startswith(("│ base_wins", "│ merge_wins"))]
    assert len(table) == 2 and "▼" in table[0] and "below base" in table[0] and "▼" not in table[1]
    assert f"{agree:.4f}" in table[0] and f"{agree - 1.0:+.4f}" in table[0]
    assert "WARNING: the merge scores below the base model on base_wins" in err

    # without compare_base nothing is compared, and the JSON says so with null
    plain = write_recipe(tmp_path, base, experts, **extra, eval={"data": ["base_wins.csv"]})
    assert main(["run", str(plain), "--out", str(tmp_path / "plain"), "--no-rules", "-q", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["below_base"] is None and doc["base_scores"] is None
    manifest = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert "below_base" not in manifest and "base_eval" not in manifest["stages"]
    assert "compare_base: true" in (tmp_path / "plain" / "report.html").read_text()


def test_compare_base_on_unlabelled_files_says_there_is_nothing_to_compare(llama, tmp_path):
    base, experts = llama
    (tmp_path / "t.csv").write_text("id,input,target,answer_choices,eval_type\n0,hi,,,generation\n")
    recipe = write_recipe(tmp_path, base, experts, eval={"data": ["t.csv"], "max_new_tokens": 2,
                                                         "compare_base": True})
    result = run_recipe(recipe, tmp_path / "r", rules=False)
    assert result.manifest["base_scores"] == {"t": None} and result.manifest["below_base"] == []
    assert any("no evaluation file has targets" in w for w in result.warnings)
