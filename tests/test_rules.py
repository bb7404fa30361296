"""Competition rule checks against HubSim (a local imitation of the Hub API): never the real Hub."""
from __future__ import annotations

import json
import time

import pytest

from mergelab.cli import main
from mergelab.errors import RuleCheckError
from mergelab.testing.hubsim import Commit, HubSim, Repo, safetensors_header
from mergelab.hub.rules import OK, UNVERIFIABLE, VIOLATION, WARN, check_models, classify_licence
from mergelab.hub.sources import HubClient


def weights(n_params: int) -> bytes:
    """A header-only safetensors file declaring ``n_params`` parameters (a few hundred bytes)."""
    tensors = {"model.embed_tokens.weight": ("BF16", [n_params // 1000, 1000])}
    if n_params % 1000:
        tensors["model.norm.weight"] = ("BF16", [n_params % 1000])
    return safetensors_header(tensors)


def sharded(n_params: int) -> dict[str, bytes]:
    """A model in two header-only shards with its index, as ``save_pretrained`` lays them out."""
    half = n_params // 2
    a = safetensors_header({"model.layers.0.weight": ("BF16", [half])})
    b = safetensors_header({"model.layers.1.weight": ("BF16", [n_params - half])})
    index = {"metadata": {"total_size": 2 * n_params},
             "weight_map": {"model.layers.0.weight": "model-00001-of-00002.safetensors",
                            "model.layers.1.weight": "model-00002-of-00002.safetensors"}}
    return {"config.json": b'{"model_type": "mistral"}', "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}


def adapter(base: str, n_params: int = 3_407_872) -> dict[str, bytes]:
    config = {"base_model_name_or_path": base, "peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": weights(n_params)}


APACHE = {"license": "apache-2.0"}
REPOS = [
    Repo("mistralai/Mistral-7B-v0.1", [Commit(sharded(7_241_732_096), date="2023-09-20")], card_data=APACHE),
    Repo("late/created", [Commit({"model.safetensors": weights(10**9)}, date="2024-10-31")], card_data=APACHE),
    Repo("late/revision", [Commit({"model.safetensors": weights(10**9)}, date="2024-02-01", title="v1"),
                           Commit({"model.safetensors": weights(10**9 + 1000)}, date="2024-07-01", title="v2")],
         card_data=APACHE),
    Repo("huge/model", [Commit({"model.safetensors": weights(70_553_706_496)}, date="2023-07-18")],
         card_data={"license": "llama2"}),
    Repo("meta-llama/Meta-Llama-3-8B", [Commit({"model.safetensors": weights(8_030_261_248)}, date="2024-04-18")],
         gated="manual", card_data={"license": "llama3"}),
    Repo("secret/model", [Commit({"model.safetensors": weights(10**9)}, date="2024-01-01")], private=True,
         card_data=APACHE),
    Repo("predibase/gsm8k", [Commit(adapter("mistralai/Mistral-7B-v0.1"), date="2024-02-20")], card_data=APACHE),
    Repo("lora/of-huge", [Commit(adapter("huge/model"), date="2024-01-05")], card_data=APACHE),
    Repo("no/licence", [Commit({"model.safetensors": weights(10**9)}, date="2024-01-01")]),
    Repo("odd/licence", [Commit({"model.safetensors": weights(10**9)}, date="2024-01-01")],
         card_data={"license": "cc-by-nc-4.0"}),
    Repo("old/pickle", [Commit({"pytorch_model.bin": b"pickle"}, date="2023-01-01")], card_data=APACHE),
]


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    with HubSim(REPOS, tokens={"hf_owner"}) as sim, sim.environ(cache_dir=tmp_path_factory.mktemp("hub-cache")):
        yield sim


@pytest.fixture
def hub(hub_server, monkeypatch):
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "1")
    hub_server.requests.clear()
    yield hub_server
    hub_server.set_fault(None)


def rows(report, model_prefix: str) -> dict[str, tuple[str, str]]:
    """{rule: (status, reason)} of the model whose label starts with ``model_prefix``."""
    return {f.rule: (f.status, f.reason) for f in report.findings if f.model.startswith(model_prefix)}


def test_a_model_that_passes_every_rule(hub):
    report = check_models([("base", {"model": "mistralai/Mistral-7B-v0.1", "revision": "main"})])
    got = rows(report, "mistralai/Mistral-7B-v0.1@main")
    assert {rule: status for rule, (status, _) in got.items()} == {
        "available": OK, "date": OK, "params": OK, "licence": OK}
    assert "7.24B (7,241,732,096)" in got["params"][1]  # counted over both shards of the index
    assert "2023-09-20" in got["date"][1]
    assert report.ok and report.exit_code == 0
    # no weights were downloaded: every GET of a safetensors file was a range request for its header
    weight_gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors")]
    assert len(weight_gets) == 2 and all(r.range == "bytes=0-100000" for r in weight_gets)


def test_repo_created_after_the_cutoff(hub):
    report = check_models([{"model": "late/created"}])
    status, reason = rows(report, "late/created")["date"]
    assert status == VIOLATION and "created 2024-10-31" in reason and "after the cut-off 2024-05-31T23:59:59Z" in reason
    assert not report.ok and report.exit_code == 1
    # a later cut-off (configurable) lets it pass
    assert rows(check_models([{"model": "late/created"}], cutoff="2024-12-31"), "late/created")["date"][0] == OK


def test_pinned_revision_after_the_cutoff_names_the_commit_to_pin(hub):
    repo = next(r for r in REPOS if r.repo_id == "late/revision")
    report = check_models([{"model": "late/revision", "revision": "main"}])
    status, reason = rows(report, "late/revision")["date"]
    assert status == VIOLATION and "2024-07-01" in reason
    assert f"pin `revision: cutoff` (commit {repo.commits[0].sha[:12]} of 2024-02-01)" in reason
    for revision in ("cutoff", repo.commits[0].sha):
        fixed = check_models([{"model": "late/revision", "revision": revision}])
        assert fixed.ok, fixed.findings
        assert fixed.models[0]["commit_sha"] == repo.commits[0].sha


def test_too_many_parameters_from_headers_without_downloading(hub):
    report = check_models([{"model": "huge/model"}])
    status, reason = rows(report, "huge/model")["params"]
    assert status == VIOLATION and "70.55B (70,553,706,496)" in reason and "more than 8B" in reason
    assert report.models[0]["parameters"] == 70_553_706_496
    # the header-only file is a few hundred bytes, but the declared model is 141 GB in BF16
    assert all(r.range for r in hub.requests if r.method == "GET" and r.path.endswith(".safetensors"))
    # the limit is configurable
    assert rows(check_models([{"model": "huge/model"}], max_params=80e9), "huge/model")["params"][0] == OK


def test_private_repo(hub):
    with_token = check_models([{"model": "secret/model"}], client=HubClient(token="hf_owner"))
    status, reason = rows(with_token, "secret/model")["available"]
    assert status == VIOLATION and "private repository" in reason
    # without a token the Hub does not reveal it: reported as not found or private
    anonymous = check_models([{"model": "secret/model"}])
    status, reason = rows(anonymous, "secret/model")["available"]
    assert status == VIOLATION and "not found" in reason and "private" in reason


def test_gated_model_passes_with_a_note(hub):
    report = check_models([{"model": "meta-llama/Meta-Llama-3-8B"}])
    got = rows(report, "meta-llama/Meta-Llama-3-8B")
    assert got["available"][0] == OK and "accept its licence" in got["available"][1]
    assert got["licence"] == (OK, "llama3 (custom open-weight licence: allowed; accept its terms)")
    # 8.03B is above 8e9 by 0.4%: the family the competition names is a warning, not a violation
    assert got["params"][0] == WARN and "8.03B" in got["params"][1]
    assert "the Hub's count: the headers are gated" in got["params"][1]  # headers are gated without a token
    assert report.ok
    with_token = rows(check_models([{"model": "meta-llama/Meta-Llama-3-8B"}], client=HubClient(token="hf_owner")),
                      "meta-llama/Meta-Llama-3-8B")
    assert "(safetensors headers)" in with_token["params"][1]


def test_header_larger_than_the_first_range_request(hub):
    # 4,000 tensors make a ~300 kB header: huggingface_hub reads the first 100 kB, then asks for the rest
    tensors = {f"model.layers.{i}.mlp.weight": ("F16", [1000, 1000]) for i in range(4000)}
    hub.add(Repo("many/tensors", [Commit({"model.safetensors": safetensors_header(tensors)}, date="2024-01-01")],
                 card_data=APACHE))
    report = check_models([{"model": "many/tensors"}])
    assert rows(report, "many/tensors")["params"][0] == OK and report.models[0]["parameters"] == 4_000_000_000
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith("model.safetensors")]
    assert ranges[0] == "bytes=0-100000" and len(ranges) == 2 and ranges[1].startswith("bytes=8-")


def test_params_tolerance_is_configurable(hub):
    strict = check_models([{"model": "meta-llama/Meta-Llama-3-8B"}], params_tolerance=0)
    assert rows(strict, "meta-llama/Meta-Llama-3-8B")["params"][0] == VIOLATION


def test_adapter_base_is_checked_too(hub):
    report = check_models([("expert 1", {"model": "lora/of-huge"})])
    adapter_rows = rows(report, "lora/of-huge")
    assert adapter_rows["params"][0] == OK and "its base huge/model is checked below" in adapter_rows["params"][1]
    base = [f for f in report.findings if f.role == "base named by expert 1"]
    assert base and base[0].model.startswith("huge/model@cutoff")
    assert {f.rule: f.status for f in base}["params"] == VIOLATION
    assert not report.ok
    # an adapter of the recipe's own base is not checked twice
    pair = check_models([("base", {"model": "mistralai/Mistral-7B-v0.1"}), ("expert 1", {"model": "predibase/gsm8k"})])
    assert pair.ok and not [f for f in pair.findings if f.role.startswith("base named by")]
    assert "is in the recipe, checked there" in rows(pair, "predibase/gsm8k")["params"][1]


def test_missing_or_unknown_licence_is_a_warning(hub):
    report = check_models([{"model": "no/licence"}, {"model": "odd/licence"}])
    assert rows(report, "no/licence")["licence"][0] == WARN
    status, reason = rows(report, "odd/licence")["licence"]
    assert status == WARN and "cc-by-nc-4.0" in reason
    assert report.ok  # warnings do not fail the check


def test_classify_licence():
    assert classify_licence({"license": "MIT"})[0] == OK
    assert classify_licence({"license": "other", "license_name": "llama3.1"})[0] == OK
    assert classify_licence({"license": "gemma"}) == (OK, "gemma (custom open-weight licence: allowed; accept its terms)")
    assert classify_licence({"license": "other", "license_name": "acme-research-only"})[0] == WARN
    assert classify_licence({})[0] == WARN


def test_pickle_only_repo_is_unverifiable(hub):
    status, reason = rows(check_models([{"model": "old/pickle"}]), "old/pickle")["params"]
    assert status == UNVERIFIABLE and "pickle" in reason


def test_missing_repo_and_revision_are_violations(hub):
    report = check_models([{"model": "nobody/nothing"}, {"model": "late/revision", "revision": "v9"}])
    assert rows(report, "nobody/nothing") == {"available": (VIOLATION, rows(report, "nobody/nothing")["available"][1])}
    assert "was not found" in rows(report, "nobody/nothing")["available"][1]
    assert "revision 'v9' does not exist" in rows(report, "late/revision")["available"][1]


def test_local_folder_is_unverifiable_and_named_repo_is_mentioned(tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    (folder / "model.safetensors").write_bytes(weights(134_515_008))
    report = check_models([("base", {"path": str(folder)})])
    got = rows(report, str(folder))
    assert got["available"][0] == UNVERIFIABLE and "SmolLM2" in got["available"][1]
    assert "not competition-legal" in got["available"][1]
    assert got["date"][0] == UNVERIFIABLE
    assert got["params"] == (OK, "135M (134,515,008) parameters (local safetensors headers), at most 8B")
    assert not report.ok and report.exit_code == 1


@pytest.mark.parametrize("fault", ["hang", "malformed", "500"])
def test_check_that_cannot_run_raises(hub, fault):
    hub.set_fault(fault)
    start = time.monotonic()
    with pytest.raises(RuleCheckError, match="the rule check could not run") as err:
        check_models([{"model": "mistralai/Mistral-7B-v0.1"}])
    assert time.monotonic() - start < 5
    assert err.value.exit_code == 2 and "HF_ENDPOINT" in str(err.value)


def test_rejected_token_stops_the_check(hub):
    with pytest.raises(RuleCheckError, match="rejected the token"):
        check_models([{"model": "mistralai/Mistral-7B-v0.1"}], client=HubClient(token="hf_stolen"))


def test_require_pass_names_each_failure(hub):
    report = check_models([("expert 1", {"model": "huge/model"}), ("expert 2", {"model": "late/created"})])
    with pytest.raises(RuleCheckError) as err:
        report.require_pass()
    message = str(err.value)
    assert "2 models break or cannot be checked against a rule" in message and "huge/model" in message and "late/created" in message
    assert "--no-rules" in message


# -- the command line ---------------------------------------------------------------------------------
def write_recipe(path, base: dict, experts: list[dict]):
    lines = ["base: " + json.dumps(base), "experts:"] + [f"  - {json.dumps(e)}" for e in experts]
    lines += ["method: linear", "seed: 0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_exit_codes(hub, tmp_path, capsys, monkeypatch):
    good = write_recipe(tmp_path / "good.yaml", {"model": "mistralai/Mistral-7B-v0.1", "revision": "main"},
                        [{"model": "predibase/gsm8k", "revision": "main"}])
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "Competition rules" in out and "passes" in out

    pinned = write_recipe(tmp_path / "pinned.yaml", {"model": "mistralai/Mistral-7B-v0.1", "revision": "cutoff"},
                          [{"model": "late/revision", "revision": "cutoff", "weight": 0.5}])
    assert main(["check", str(pinned)]) == 0  # `revision: cutoff` goes through the recipe schema
    capsys.readouterr()

    bad = write_recipe(tmp_path / "bad.yaml", {"model": "mistralai/Mistral-7B-v0.1", "revision": "main"},
                       [{"model": "late/revision", "revision": "main"}])
    assert main(["check", str(bad), "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "does not pass the competition rules (7 ok, 1 violation)" in " ".join(captured.err.split())
    assert data["ok"] is False and data["cutoff"] == "2024-05-31T23:59:59Z"
    assert {"model", "role", "rule", "status", "reason"} <= set(data["findings"][0])
    assert [f["rule"] for f in data["findings"] if f["status"] == "violation"] == ["date"]
    assert main(["check", str(bad), "--cutoff", "2024-07-01"]) == 0  # the cut-off is configurable
    capsys.readouterr()

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model.safetensors").write_bytes(weights(10**6))
    local = write_recipe(tmp_path / "local.yaml", {"path": "local"}, [{"model": "predibase/gsm8k"}])
    assert main(["check", str(local), "--json"]) == 1  # a local folder cannot be verified
    data = json.loads(capsys.readouterr().out)
    available = {f["model"]: f["status"] for f in data["findings"] if f["rule"] == "available"}
    assert available.pop(str(tmp_path / "local")) == "unverifiable"  # the relative path, resolved by the loader
    assert set(available.values()) == {"ok"}  # the adapter and the base it names

    broken = tmp_path / "broken.yaml"
    broken.write_text("base: {model: a/b}\nexperts: []\nmethod: linear\n")
    assert main(["check", str(broken)]) == 2  # the recipe loader's message, exit status 2
    assert "experts" in capsys.readouterr().err

    hub.set_fault("hang")
    start = time.monotonic()
    assert main(["check", str(good)]) == 2
    assert time.monotonic() - start < 5
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "could not run" in err and "did not answer within 1 s" in err


def test_run_on_local_folders_says_in_words_what_cannot_be_verified(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # the message must not depend on the terminal's width
    folders = []
    for name in ("base", "e1", "e2"):
        folder = tmp_path / "a-rather-long-folder-name-for-the-models" / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(weights(10**6))
        (folder / "config.json").write_text('{"model_type": "llama"}')
        folders.append(folder)
    recipe = write_recipe(tmp_path / "r.yaml", {"path": str(folders[0])},
                          [{"path": str(f), "weight": 0.5} for f in folders[1:]])
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "[available]" not in err and "[date]" not in err  # words, not rule ids
    lines = err.splitlines()
    for role, folder in zip(("base", "expert 1", "expert 2"), folders):
        assert f"  - {role}: {folder}" in lines  # each path whole, on its own line
    assert "3 local folders cannot be verified" in err
    assert err.count("its Hub upload date and public availability cannot be verified "
                     "(only a Hub repository has them)") == 3
    flat = " ".join(err.split())
    assert "use Hub references pinned to a commit" in flat and "revision: cutoff" in flat
    assert "or pass --no-rules for a run outside the competition" in flat
    assert not (tmp_path / "out" / "model").exists()


def test_explain_failures_words_hub_violations_too(hub):
    from mergelab.hub.rules import explain_failures

    report = check_models([("expert 1", {"model": "late/created"}), ("expert 2", {"model": "old/pickle"})])
    message, hint = explain_failures(report)
    assert "2 models break or cannot be checked against a rule" in message
    assert "  - expert 1: late/created@main (" in message  # the label as `mergelab check` shows it
    assert "\n      uploaded on or before the cut-off (violated): repository created 2024-10-31, after the cut-off" \
        in message
    assert "size (cannot be verified): no safetensors weights (pickle only)" in message
    assert "local folder" not in message and "`mergelab check RECIPE`" in hint and "--no-rules" in hint
