"""MERGELAB_HUB_TIMEOUT is the time of one whole Hub operation, not of each read.

Against a HubSim that trickles its answers one byte at a time: each read gets a byte long before a
per-read timeout would fire, so before the overall deadline existed these calls hung for hours.
"""
from __future__ import annotations

import time

import pytest
import yaml

from mergelab.cli import main
from mergelab.errors import MergelabError, RuleCheckError, SourceError
from mergelab.hub import deadline
from mergelab.hub.rules import check_models
from mergelab.hub.sources import HubClient, HubUnreachableError, resolve_ref
from mergelab.testing.hubsim import Commit, HubSim, Repo, safetensors_header

FILES = {"config.json": b'{"model_type": "llama"}',
         "model.safetensors": safetensors_header({"model.embed_tokens.weight": ("BF16", [1000, 1000])})}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "1")
    repo = Repo("org/model", [Commit(FILES, date="2024-01-10")], card_data={"license": "apache-2.0"})
    with HubSim([repo]) as sim, sim.environ(cache_dir=tmp_path / "hub-cache"):
        yield sim


def assert_deadline_message(message: str, seconds: str = "1") -> None:
    message = " ".join(message.split())
    assert f"did not answer within {seconds} s" in message
    assert "MERGELAB_HUB_TIMEOUT (now 1 s) is the time allowed for one whole Hub operation" in message
    assert "HF_ENDPOINT" in message and "path:" in message


def test_a_trickling_hub_is_cut_off_at_the_deadline(hub):
    hub.set_fault("trickle", interval=0.2)  # 5 bytes a second: never a per-read timeout
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        resolve_ref({"model": "org/model", "revision": "main"})
    assert time.monotonic() - start < 3
    assert isinstance(err.value, MergelabError)
    assert_deadline_message(str(err.value) + " " + err.value.hint)
    assert deadline.remaining() is None  # nothing is left armed after the operation


def test_trickled_safetensors_headers_are_cut_off(hub):
    client = HubClient()
    info = client.model("org/model", "main")  # metadata answers normally
    hub.set_fault("trickle", "/resolve/", interval=0.2)  # the range reads of the header trickle
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as err:
        client.parameter_count(info)
    assert time.monotonic() - start < 3
    assert "reading the safetensors headers of 'org/model'" in str(err.value)


def test_a_trickled_download_is_cut_off(hub):
    client = HubClient()
    info = client.model("org/model", "main")
    hub.set_fault("trickle", "/resolve/", interval=0.2)
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match="downloading 'org/model'"):
        client.download(info)
    assert time.monotonic() - start < 4


def test_the_deadline_is_per_operation_not_per_process(hub):
    client = HubClient()
    for _ in range(3):  # three operations in a row, each well inside its own second
        assert client.model("org/model", "main").sha
    assert deadline.remaining() is None
    hub.set_fault("trickle", "/commits/", interval=0.2)
    with pytest.raises(HubUnreachableError):
        client.model("org/model", "main")
    hub.set_fault(None)
    assert client.model("org/model", "main").sha  # the next operation has its full time again


def test_check_cli_on_a_trickling_hub_ends_in_one_message(hub, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"model": "org/model", "revision": "main"},
                                      "experts": [{"model": "org/model", "revision": "main"}],
                                      "method": {"name": "linear"}}))
    hub.set_fault("trickle", interval=0.2)
    start = time.monotonic()
    assert main(["check", str(recipe)]) == 2
    assert time.monotonic() - start < 6
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_deadline_message(err)


def test_check_models_cannot_run_past_the_deadline(hub):
    hub.set_fault("trickle", interval=0.2)
    start = time.monotonic()
    with pytest.raises(RuleCheckError, match="could not run: the Hub at .* did not answer within 1 s"):
        check_models([("base", {"model": "org/model", "revision": "main"})])
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_timeout_value_is_one_message(value, monkeypatch):
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", value)
    with pytest.raises(SourceError, match="MERGELAB_HUB_TIMEOUT must be a number of seconds above 0"):
        HubClient()
