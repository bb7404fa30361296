"""Model sources against HubSim (a local imitation of the Hub API): never the real Hub."""
from __future__ import annotations

import socket
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load, save

from mergelab.errors import CheckpointError, SourceError
from mergelab.testing.hubsim import Commit, HubSim, Repo, safetensors_header
from mergelab.hub.sources import (DEFAULT_CUTOFF, HubAccessError, HubClient, HubNotFoundError, HubResponseError, HubUnreachableError, PickleOnlyError, parse_cutoff, resolve_model, resolve_ref, select_files)


def weights(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"model.embed.weight": rng.standard_normal((8, 4)).astype(np.float32),
                 "model.norm.weight": np.ones(4, np.float32)})


def model_files(seed: int) -> dict[str, bytes]:
    """A repo the way the Hub holds one: weights in two formats, docs, sub-folders."""
    return {
        "config.json": b'{"model_type": "llama"}',
        "generation_config.json": b'{"do_sample": false}',
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"model_max_length": 64}',
        "special_tokens_map.json": b'{"eos_token": "</s>"}',
        "chat_template.jinja": b"{{ messages }}",
        "model.safetensors": weights(seed),
        "pytorch_model.bin": b"pickle bytes that must never be fetched",
        "README.md": b"---\nlicense: apache-2.0\n---\n# a model\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "original/consolidated.00.pth": b"more pickle",
        "onnx/model.onnx": b"onnx",
    }


@pytest.fixture
def repo():
    return Repo("org/model", [
        Commit(model_files(1), date="2024-01-10T08:00:00Z", title="first upload"),
        Commit(model_files(2), date="2024-05-31T23:00:00Z", title="retrain"),
        Commit(model_files(3), date="2024-06-01T00:00:01Z", title="after the cut-off"),
    ], refs={"v1.0": 0})


@pytest.fixture
def hub(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "1.5")
    with HubSim([repo], tokens={"hf_good"}) as sim, sim.environ(cache_dir=tmp_path / "hub-cache"):
        yield sim


def get_requests(hub):
    """Paths of whole-file GETs (a range request for a header is not a download)."""
    return [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path and not r.range]


def test_pinned_sha_downloads_that_commit_into_the_hub_cache(hub, repo, tmp_path):
    sha = repo.commits[0].sha
    ref = resolve_ref(SimpleNamespace(path=None, model="org/model", revision=sha))
    assert ref.commit_sha == sha and ref.requested_revision == sha
    assert ref.commit_date == datetime(2024, 1, 10, 8, tzinfo=timezone.utc)
    assert ref.local_path == tmp_path / "hub-cache" / "models--org--model" / "snapshots" / sha
    got = load((ref.local_path / "model.safetensors").read_bytes())
    want = load(model_files(1)["model.safetensors"])
    np.testing.assert_array_equal(got["model.embed.weight"], want["model.embed.weight"])
    # the manifest form records the sha and the commit date
    assert ref.to_dict()["commit_sha"] == sha and ref.to_dict()["commit_date"] == "2024-01-10T08:00:00Z"


def test_branch_and_tag_resolve_to_their_commit_sha(hub, repo, tmp_path):
    main = resolve_ref({"model": "org/model", "revision": "main"})
    assert main.commit_sha == repo.commits[2].sha and main.requested_revision == "main"
    assert main.local_path.name == repo.commits[2].sha
    tag = resolve_ref({"model": "org/model", "revision": "v1.0"})
    assert tag.commit_sha == repo.commits[0].sha and tag.requested_revision == "v1.0"
    no_revision = resolve_ref({"model": "org/model"})
    assert no_revision.commit_sha == repo.commits[2].sha and no_revision.requested_revision == "main"
    # what was downloaded is pinned by sha: the files come from the resolved commit, not a later one
    assert get_requests(hub) and all(repo.commits[2].sha in p or repo.commits[0].sha in p for p in get_requests(hub))


def test_only_the_needed_files_are_downloaded(hub):
    ref = resolve_ref({"model": "org/model", "revision": "main"})
    expected = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert list(ref.files) == expected
    assert sorted(p.name for p in ref.local_path.iterdir()) == expected
    fetched = {p.rsplit("/", 1)[-1] for p in get_requests(hub)}
    assert fetched == set(expected)  # no .bin, README, .gitattributes, original/, onnx/


def test_select_files_rules():
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "consolidated.safetensors", "pytorch_model.bin",
             "tokenizer.model", "README.md", "sub/model.safetensors", "adapter_config.json"]
    assert select_files(files) == ["adapter_config.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                   "tokenizer.model"]
    # a repo whose only safetensors is the consolidated file keeps it
    assert select_files(["consolidated.safetensors", "params.json"]) == ["consolidated.safetensors"]


def test_cutoff_revision_picks_the_last_commit_on_or_before_the_cutoff(hub, repo):
    ref = resolve_ref({"model": "org/model", "revision": "cutoff"})  # default 2024-05-31 23:59:59 UTC
    assert ref.commit_sha == repo.commits[1].sha and ref.requested_revision == "cutoff"
    assert ref.to_dict()["commit_date"] == "2024-05-31T23:00:00Z"
    early = resolve_ref({"model": "org/model", "revision": "cutoff"}, cutoff="2024-05-31T22:59:59Z",
                        download=False)
    assert early.commit_sha == repo.commits[0].sha and early.local_path is None
    with pytest.raises(HubNotFoundError, match="no commit on or before the cut-off 2023-12-31T23:59:59Z") as err:
        resolve_ref({"model": "org/model", "revision": "cutoff"}, cutoff="2023-12-31", download=False)
    assert "2024-01-10T08:00:00Z" in str(err.value)  # says when the repo's history starts


def test_cutoff_search_reads_commit_pages_lazily(tmp_path, monkeypatch):
    commits = [Commit({"model.safetensors": weights(i)}, date=f"2024-0{m}-01") for i, m in enumerate(range(1, 10))]
    repo = Repo("org/long", commits)
    with HubSim([repo], page_size=2) as hub, hub.environ(cache_dir=tmp_path):
        client = HubClient(timeout=2)
        found = client.commit_on_or_before("org/long", parse_cutoff("2024-04-15"))
        assert found.sha == commits[3].sha  # 2024-04-01, on the third page (newest first: 9,8 | 7,6 | 5,4)
        pages = [r for r in hub.requests if "/commits/" in r.path]
        assert [r.query.get("p", ["0"])[0] for r in pages] == ["0", "1", "2"]


def test_repo_not_found_is_a_clear_error(hub):
    with pytest.raises(HubNotFoundError) as err:
        resolve_ref({"model": "org/missing", "revision": "main"})
    message = str(err.value)
    assert "'org/missing' was not found" in message and hub.url in message
    assert "path:" in message  # tells how to use a local folder instead


@pytest.mark.parametrize("revision", ["main", "cutoff"])
def test_invalid_repo_id_never_reaches_the_server(hub, revision):
    with pytest.raises(SourceError, match="'../etc' is not a valid Hub repository id"):
        resolve_ref({"model": "../etc", "revision": revision})
    assert hub.requests == []


def test_private_repo_without_token_looks_like_not_found(hub):
    hub.add(Repo("org/secret", [Commit(model_files(4), date="2024-01-01")], private=True))
    with pytest.raises(HubNotFoundError, match="private"):
        resolve_ref({"model": "org/secret"})
    ok = resolve_ref({"model": "org/secret"}, client=HubClient(token="hf_good"))
    assert (ok.local_path / "model.safetensors").exists()


def test_revision_not_found_is_a_clear_error(hub):
    with pytest.raises(HubNotFoundError, match="revision 'v9' does not exist in Hub repository 'org/model'") as err:
        resolve_ref({"model": "org/model", "revision": "v9"})
    assert "revision: cutoff" in str(err.value)


def test_gated_repo_needs_licence_and_token(hub):
    hub.add(Repo("meta/gated", [Commit(model_files(5), date="2024-04-18")], gated="manual"))
    with pytest.raises(HubAccessError, match="gated") as err:
        resolve_ref({"model": "meta/gated"})
    assert f"{hub.url}/meta/gated" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert resolve_ref({"model": "meta/gated"}, client=HubClient(token="hf_good")).commit_sha


def test_rejected_token(hub):
    with pytest.raises(HubAccessError, match="rejected the token"):
        resolve_ref({"model": "org/model"}, client=HubClient(token="hf_wrong"))


def test_timeout_is_a_clear_error_within_seconds(hub):
    hub.set_fault("hang")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        resolve_ref({"model": "org/model", "revision": "main"})
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "did not answer within 1.5 s" in message and "HF_ENDPOINT" in message and "path:" in message


def test_unreachable_endpoint(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with HubSim() as hub, hub.environ(cache_dir=tmp_path):
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        with pytest.raises(HubUnreachableError, match=f"cannot connect to the Hub at http://127.0.0.1:{port}"):
            resolve_ref({"model": "org/model"})


def test_endpoint_is_read_when_called_not_at_import(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.invalid")  # stale import-time value
    assert HubClient().endpoint == hub.url
    assert resolve_ref({"model": "org/model"}, download=False).commit_sha


def test_malformed_answer(hub):
    hub.set_fault("malformed")
    with pytest.raises(HubResponseError, match="not the Hub's"):
        resolve_ref({"model": "org/model"})


def test_pickle_only_repo(hub):
    hub.add(Repo("old/pickle", [Commit({"config.json": b"{}", "pytorch_model.bin": b"x"}, date="2023-01-01")]))
    with pytest.raises(PickleOnlyError, match="pickle weights only") as err:
        resolve_ref({"model": "old/pickle"})
    assert "refs/pr/" in str(err.value)
    assert not [r for r in hub.requests if "pytorch_model.bin" in r.path]


def test_pinned_sha_is_served_from_cache_when_the_hub_is_down(hub, repo):
    sha = repo.commits[1].sha
    first = resolve_ref({"model": "org/model", "revision": sha})
    hub.set_fault("hang")
    again = resolve_ref({"model": "org/model", "revision": sha})
    assert again.from_cache_only and again.local_path == first.local_path and again.commit_sha == sha
    with pytest.raises(HubUnreachableError):  # a branch name is not pinned: no silent fallback
        resolve_ref({"model": "org/model", "revision": "main"})


def test_offline_mode_uses_the_cache_for_pinned_shas_only(hub, repo, monkeypatch):
    from huggingface_hub import constants

    sha = repo.commits[0].sha
    first = resolve_ref({"model": "org/model", "revision": sha})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n_requests = len(hub.requests)
    again = resolve_ref({"model": "org/model", "revision": sha})
    assert again.from_cache_only and again.local_path == first.local_path
    with pytest.raises(HubUnreachableError, match="offline mode is on"):
        resolve_ref({"model": "org/model", "revision": "v1.0"})
    assert len(hub.requests) == n_requests  # nothing went out


def test_local_path(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    ref = resolve_ref(SimpleNamespace(path=str(tmp_path / "m"), model=None, revision=None))
    assert ref.source == "local" and ref.local_path == tmp_path / "m" and ref.files == ("config.json",)
    assert resolve_model({"path": tmp_path / "m"}) == tmp_path / "m"
    with pytest.raises(CheckpointError, match="local model folder not found"):
        resolve_model({"path": tmp_path / "nope"})
    with pytest.raises(SourceError, match="exactly one of `path` or `model`"):
        resolve_model({"path": tmp_path / "m", "model": "org/model"})


def test_parse_cutoff():
    assert parse_cutoff(None) == DEFAULT_CUTOFF == datetime(2024, 5, 31, 23, 59, 59, tzinfo=timezone.utc)
    assert parse_cutoff("2024-05-31") == DEFAULT_CUTOFF
    assert parse_cutoff("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_cutoff("2024-05-01T14:00:00+02:00") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    with pytest.raises(SourceError, match="not a date"):
        parse_cutoff("last may")


def test_header_only_safetensors_declares_big_shapes():
    blob = safetensors_header({"w": ("BF16", [100_000, 100_000])})
    assert len(blob) < 200
    import json
    import struct

    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0 and json.loads(blob[8:8 + n])["w"]["data_offsets"] == [0, 2 * 10**10]
