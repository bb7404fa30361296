"""``mergelab eval``: outputs, progress with rows/s, and user errors (one message, exit status 2)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from mergelab.cli import main

HEADER = ["id", "input", "target", "answer_choices", "eval_type"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write(path, rows):
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


@pytest.fixture()
def files(tmp_path):
    a = _write(tmp_path / "a.csv", [
        ["3", "Question: What is two plus three?\nAnswer:", "0", "[' five', ' six', ' seven']", "multiple_choice"],
        ["1", "The quick brown fox", "jumps", "", "generation"],
        ["2", "Sentiment: I loved this film. Label:", "1", '["negative", "positive"]', "multiple_choice"],
    ])
    b = _write(tmp_path / "b.csv", [["x", "Dates: 2024-05-31 is", "", "", "generation"]])
    return a, b


def test_eval_writes_submissions_and_scores(tmp_path, files, zoo, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal setting must not squeeze what goes to a pipe
    a, b = files
    out = tmp_path / "out"
    code = main(["eval", str(zoo["gemma"].base), "--data", str(a), "--data", str(b), "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", "5", "--device", "cpu", "--stop", r"\n"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "rows/s" in captured.err and "4/4" in captured.err  # the progress bar, on stderr
    assert "overall" in captured.out and "a.csv" in captured.out  # the scores table, not cut at 40 columns
    with (out / "a.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "prediction", "dummy_field"] and [r[0] for r in rows[1:]] == ["3", "1", "2"]
    assert rows[1][1] in {"0", "1", "2"} and rows[3][1] in {"0", "1"}
    assert (out / "b.csv").exists() and (out / "predictions" / "b.jsonl").exists()
    scores = json.loads((out / "scores.json").read_text())
    assert scores["files"]["a.csv"]["rows"] == 3 and scores["overall"]["rows"] == 4
    assert scores["options"]["stop"] == ["\n"] and scores["options"]["max_new_tokens"] == 5  # escape read


def test_eval_adapter_and_prompting_flags(tmp_path, files, zoo, capsys):
    a, _ = files
    out = tmp_path / "out"
    code = main(["eval", str(zoo["llama"].base), "--adapter", str(zoo["llama"].loras[0]), "--data", str(a),
                 "--out", str(out), "--max-new-tokens", "3", "--chat", "--few-shot", "1", "--shots", str(a),
                 "--cot", "--length-norm", "tokens"])
    assert code == 0, capsys.readouterr().err
    preds = [json.loads(x) for x in (out / "predictions" / "a.jsonl").read_text().splitlines()]
    assert all(p["prompt"].startswith("<|user|>") for p in preds)
    assert all(len(p["shots"]) == 1 and p["shots"][0] != p["id"] for p in preds)
    assert all("normalized" in p and "cot_extraction" in p for p in preds if p["eval_type"] == "multiple_choice")
    assert json.loads((out / "scores.json").read_text())["adapter"] == str(zoo["llama"].loras[0])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    return err


def test_bad_csv_is_one_message_with_exit_2(tmp_path, zoo, capsys):
    bad = _write(tmp_path / "bad.csv", [["q1", "Pick", "0", "['a', 'b'", "multiple_choice"]])
    out = tmp_path / "out"
    code = main(["eval", str(zoo["llama"].base), "--data", str(bad), "--out", str(out)])
    assert code == 2
    err = _one_error(capsys)
    assert "bad.csv" in err and "row id 'q1'" in err and "not a list literal" in err
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--few-shot", "2"], "needs `shots`"),
    (["--chat"], "no chat template"),
    (["--adapter", "NOPE"], "no adapter_config.json"),
])
def test_other_user_errors(tmp_path, files, zoo, capsys, args, expected):
    a, _ = files
    model = zoo["llama"].base
    if "--chat" in args:  # a copy of the model whose tokenizer has no chat template
        import shutil

        model = tmp_path / "nochat"
        shutil.copytree(zoo["llama"].base, model)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
        (model / "chat_template.jinja").unlink(missing_ok=True)
    code = main(["eval", str(model), "--data", str(a), "--out", str(tmp_path / "out"), *args])
    assert code == 2
    assert expected in _one_error(capsys)


def test_missing_model_and_existing_output(tmp_path, files, zoo, capsys):
    a, _ = files
    assert main(["eval", str(tmp_path / "nomodel"), "--data", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in _one_error(capsys)
    (tmp_path / "o").mkdir()   # an empty folder loses nothing: it is simply used
    (tmp_path / "o" / "mine.txt").write_text("keep")
    assert main(["eval", str(zoo["llama"].base), "--data", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "--force" in _one_error(capsys)
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep"


def test_unescape_stop_strings():
    from mergelab.commands.evaluate import unescape

    assert unescape(r"\n\nInput:") == "\n\nInput:"
    assert unescape(r"a\tb\\n") == "a\tb\\n"      # an escaped backslash stays one backslash
    assert unescape(r"\q 東京") == r"\q 東京"      # unknown escapes and unicode are kept


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_model(src, dst, payload=None):
    """A copy of the model at ``src`` whose weights are ``pytorch_model.bin`` (what safe_serialization=False writes)."""
    import shutil

    from mergelab.testing import load_model

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    state = dict(load_model(src).state_dict())  # transformers 5 always writes safetensors: torch.save it ourselves
    if payload is not None:  # a payload inside: weights_only would block it with a hint to unblock it
        state["payload"] = _Payload(payload)
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_eval_refuses_pickle_model_weights_with_the_conversion_command(tmp_path, files, zoo, capsys):
    a, _ = files
    marker = tmp_path / "payload-ran"
    model = _pickle_model(zoo["llama"].base, tmp_path / "pickled", payload=marker)
    out = tmp_path / "out"
    assert main(["eval", str(model), "--data", str(a), "--out", str(out)]) == 2
    err = " ".join(_one_error(capsys).split())
    assert "pytorch_model.bin" in err and "never unpickles a file" in err
    assert "save_pretrained(" in err and "safe_serialization=True" in err  # the conversion command
    assert "weights_only=False" not in err
    assert not marker.exists() and not out.exists()


def test_eval_refuses_a_pickle_adapter_with_the_conversion_command(tmp_path, files, zoo, capsys):
    import shutil

    from peft import PeftModel
    from mergelab.testing import load_model

    a, _ = files
    adapter = tmp_path / "adapter"
    PeftModel.from_pretrained(load_model(zoo["llama"].base), str(zoo["llama"].loras[0])).save_pretrained(
        adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    out = tmp_path / "out"
    assert main(["eval", str(zoo["llama"].base), "--adapter", str(adapter), "--data", str(a),
                 "--out", str(out)]) == 2
    err = " ".join(_one_error(capsys).split())
    assert "adapter_model.bin" in err and "never unpickles a file" in err
    assert f"PeftModel.from_pretrained(M.from_pretrained('{zoo['llama'].base}'), '{adapter}')" in err
    assert "safe_serialization=True" in err and not out.exists()
    shutil.rmtree(adapter)
