"""Model cards of merge outputs and `mergelab push`, against HubSim (a local imitation of the Hub)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, snapshot_download

from mergelab.cli import main
from mergelab.errors import SourceError
from mergelab.hub.push import push_folder
from mergelab.hub.sources import HubAccessError, HubNotFoundError, HubUnreachableError
from mergelab.merge import merge
from mergelab.run.pipeline import run_recipe
from mergelab.testing import make_lora, tree_bytes
from mergelab.testing.hubsim import Commit, HubSim, Repo, files_from_folder



def test_card_of_local_inputs_derives_the_licence_and_warns_on_a_conflict(llama, tmp_path):
    base, (e1, e2) = llama
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base\n")
    (e1 / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    recipe = {"base": {"path": str(base)}, "experts": [{"path": str(e1)}, {"path": str(e2)}],
              "method": {"name": "ties", "density": 0.5}}
    warned: list[str] = []
    merge(recipe, tmp_path / "a", progress=False, warn=warned.append)
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.license == "apache-2.0" and not warned            # e2 states none: not a conflict
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "merge"
    assert card.data.tags == ["merge", "mergelab", "ties"] and card.data.base_model is None  # local folders only
    assert f"local folder `{base}`" in card.text and "arXiv:2306.01708" in card.text   # TIES' paper
    assert "the base" not in card.text                                 # the base's own card is not copied
    # same recipe and inputs, same bytes (no timestamp, no output path)
    merge(recipe, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "README.md").read_bytes() == (tmp_path / "b" / "README.md").read_bytes()

    (e2 / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\n---\n")
    result = merge(recipe, tmp_path / "c", progress=False, warn=warned.append)
    card = ModelCard.load(tmp_path / "c" / "README.md")
    assert card.data.license == "other" and card.data.license_name == "mixed"
    assert len(warned) == 1 and "licences conflict (apache-2.0, llama3)" in warned[0]
    assert warned[0] in result.warnings and "Licence warning" in card.text


def test_adapter_output_card_says_peft(zoo, tmp_path):
    fz = zoo["llama"]
    loras = [make_lora(fz.base, tmp_path / f"l{i}", seed=i) for i in range(2)]
    merge({"base": {"path": str(fz.base)}, "experts": [{"path": str(p)} for p in loras],
           "method": {"name": "task_arithmetic"}, "output": {"format": "lora"}}, tmp_path / "ad", progress=False)
    card = ModelCard.load(tmp_path / "ad" / "README.md")
    assert card.data.library_name == "peft" and "task_arithmetic" in card.data.tags
    assert (tmp_path / "ad" / "adapter_config.json").is_file()


@pytest.fixture
def hub(zoo, tmp_path, monkeypatch):
    fz = zoo["llama"]
    repos = [Repo("org/base", [Commit(files_from_folder(fz.base), date="2024-03-01T00:00:00Z")],
                  card_data={"license": "apache-2.0"}),
             Repo("org/expert", [Commit(files_from_folder(fz.experts[0]), date="2024-04-01T00:00:00Z")],
                  card_data={"license": "apache-2.0"})]
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "5")
    with HubSim(repos, tokens={"hf_me", "hf_reader"}, writers={"hf_me": {"me"}}) as sim, \
            sim.environ(cache_dir=tmp_path / "cache"):
        monkeypatch.setenv("HF_TOKEN", "hf_me")
        yield sim


def test_hub_inputs_are_the_base_models_and_a_push_downloads_back_equal(hub, zoo, tmp_path):
    recipe = {"base": {"model": "org/base", "revision": "main"},
              "experts": [{"model": "org/expert", "revision": "main", "weight": 1.0},
                          {"path": str(zoo["llama"].experts[1]), "weight": 0.5}],
              "method": {"name": "task_arithmetic"}}
    out = tmp_path / "merged"
    merge(recipe, out, progress=False)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/base", "org/expert"] and card.data.license == "apache-2.0"
    shas = [hub.repos[r].commits[0].sha for r in ("org/base", "org/expert")]
    assert all(f"`{sha}`" in card.text for sha in shas)                # pinned revisions in the body
    assert f"local folder `{zoo['llama'].experts[1]}`" in card.text

    first = push_folder(out, "me/merged")
    assert first.changed and first.commit_url.endswith(f"/me/merged/commit/{first.commit_sha}")
    back = Path(snapshot_download("me/merged", revision=first.commit_sha, cache_dir=tmp_path / "dl"))
    assert {k: v for k, v in tree_bytes(back).items() if k != ".gitattributes"} == tree_bytes(out)
    assert ModelCard.load(back / "README.md").data.base_model == ["org/base", "org/expert"]
    assert any(r.method == "PUT" and r.path.startswith("/lfs-upload/") for r in hub.requests)   # weights via LFS

    same = push_folder(out, "me/merged")                                # the same bytes: no new commit
    assert not same.changed and same.commit_sha == first.commit_sha
    (out / "extra.txt").write_text("notes\n")
    (out / "generation_config.json").unlink()
    second = push_folder(out, "me/merged")
    assert second.changed and second.commit_sha != first.commit_sha
    assert hub.repos["me/merged"].history(hub.repos["me/merged"].refs["main"])[1].sha == first.commit_sha
    assert {k for k in hub.files("me/merged") if k != ".gitattributes"} == set(tree_bytes(out))   # deletions too
    branch = push_folder(out, "me/merged", revision="v2")
    assert hub.files("me/merged", "v2") == hub.files("me/merged") and branch.revision == "v2"


def test_push_failures_are_clear_errors(hub, tmp_path, monkeypatch):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "config.json").write_text("{}")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))          # no cached login either
    with pytest.raises(HubAccessError, match="needs a Hub token with write access, and none was found"):
        push_folder(out, "me/x")
    with pytest.raises(HubAccessError, match="rejected your token"):
        push_folder(out, "me/x", token="hf_wrong")
    with pytest.raises(HubAccessError, match="your token may not write to 'org/x'") as err:
        push_folder(out, "org/x", token="hf_me")
    assert "write access" in err.value.hint
    with pytest.raises(HubNotFoundError, match="revision 'refs/pr/9' does not exist"):
        push_folder(out, "me/x", token="hf_me", revision="refs/pr/9")
    with pytest.raises(SourceError, match="not a Hub repository id"):
        push_folder(out, "no-owner", token="hf_me")
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "1")
    hub.set_fault("hang", "/preupload/")
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError, match="did not finish the push to 'me/x' in time"):
        push_folder(out, "me/x", token="hf_me")
    assert time.monotonic() - t0 < 5
    hub.set_fault(None)
    assert "me/x" in hub.repos and set(hub.files("me/x")) == {".gitattributes"}   # nothing half-published


def test_run_card_has_the_scores_survives_reruns_and_push_records_the_commit(llama, tmp_path, hub, capsys):
    base, experts = llama
    (tmp_path / "mc.csv").write_text(
        "id,input,target,answer_choices,eval_type\n"
        "a,\"Question: two plus three?\nAnswer:\",1,\"['four', 'five']\",multiple_choice\n"
        "b,Sentiment: I loved it. Label:,0,\"['positive', 'negative']\",multiple_choice\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": {"path": str(base)}, "experts": [{"path": str(e)} for e in experts],
        "method": {"name": "dare_ties", "density": 0.5}, "seed": 3,
        "eval": {"data": ["mc.csv"], "batch_size": 2}}))
    out = tmp_path / "run"
    first = run_recipe(recipe, out, rules=False)
    card = (out / "model" / "README.md").read_text()
    assert "## Scores" in card and "| mc.csv |" in card and "Not checked (--no-rules)" in card
    assert "model/README.md" in first.manifest["outputs"]
    again = run_recipe(recipe, out, rules=False)
    assert {s.name: s.status for s in again.stages}["merge"] == "skipped"
    assert again.manifest["outputs"] == first.manifest["outputs"] and (out / "model" / "README.md").read_text() == card

    assert main(["push", str(out), "--repo", "me/run"]) == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["push"] == {"repo": "me/run", "revision": "main", "commit_url": url}
    files = hub.files("me/run")
    assert files["README.md"] == card.encode() and "config.json" in files       # the model at the root
    assert {"mergelab-run/manifest.json", "mergelab-run/eval/scores.json", "mergelab-run/eval/mc.csv"} <= set(files)
    third = run_recipe(recipe, out, rules=False)                       # same bytes: the push record stays
    assert third.manifest["push"] == manifest["push"]
