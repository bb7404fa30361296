"""The judge's parts on their own: safe unpacking, the home, intake checks, scoring, similarity
evidence, fingerprints and the sandbox (no judged run of a model here: see test_judge_round.py)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergelab.cli import main
from mergelab.testing.hubsim import Commit, HubSim, Repo, safetensors_header
from mergelab.judge.archive import Caps, UnsafeSubmissionError, unpack
from mergelab.judge.db import connect
from mergelab.testing.judge_season import write_tasks
from mergelab.judge.fingerprint import cosine, task_vector_sketch
from mergelab.judge.home import JudgeError, init_home, is_public
from mergelab.judge.intake import submit
from mergelab.judge.rounds import run_round
from mergelab.judge.sandbox import namespaces_available, run_limited
from mergelab.judge.scoring import GarbageOutput, read_predictions, score
from mergelab.judge.similar import expected_agreement, recipe_equivalent
from mergelab.testing import make_base


# ------------------------------------------------------------------------------------ archives
def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("members, why", [
    ([(member("/etc/evil"), b"x")], "absolute path"),
    ([(member("a/../../evil"), b"x")], "'..'"),
    ([(member("l", tarfile.SYMTYPE, "/etc/passwd"), None)], "points outside"),
    ([(member("d/l", tarfile.SYMTYPE, "../../x"), None)], "points outside"),
    ([(member("h", tarfile.LNKTYPE, "../outside"), None)], "points outside"),
    ([(member("dev", tarfile.CHRTYPE), None)], "device file"),
    ([(member("fifo", tarfile.FIFOTYPE), None)], "device file or FIFO"),
])
def test_unsafe_archives_are_refused_and_nothing_is_written(tmp_path, members, why):
    archive = tar_of(tmp_path / "a.tar.gz", [(member("recipe.yaml"), b"base: {}\n"), *members])
    dest = tmp_path / "store" / "x"
    (tmp_path / "store").mkdir()
    with pytest.raises(UnsafeSubmissionError, match=why):
        unpack(archive, dest)
    assert not dest.exists() and not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar.gz", "store"]


def test_bomb_file_count_and_size_caps(tmp_path):
    zeros = tar_of(tmp_path / "bomb.tar.gz", [(member("zeros"), bytes(5_000_000))])
    assert zeros.stat().st_size < 20_000
    with pytest.raises(UnsafeSubmissionError, match="decompression bomb"):
        unpack(zeros, tmp_path / "a", Caps(max_ratio=100))
    with pytest.raises(UnsafeSubmissionError, match="more than 1000000 bytes"):
        unpack(zeros, tmp_path / "b", Caps(max_bytes=1_000_000, max_ratio=1e9))
    many = tar_of(tmp_path / "many.tar.gz", [(member(f"f{i}"), b"x") for i in range(12)])
    with pytest.raises(UnsafeSubmissionError, match="more than 10 entries"):
        unpack(many, tmp_path / "c", Caps(max_files=10))
    assert not any((tmp_path / d).exists() for d in "abc")


def test_links_inside_become_copies_and_folders_follow_the_same_rules(tmp_path):
    archive = tar_of(tmp_path / "ok.tar.gz", [(member("m/w.txt"), b"weights"),
                                              (member("m/alias", tarfile.SYMTYPE, "w.txt"), None)])
    unpack(archive, tmp_path / "out")
    assert (tmp_path / "out/m/alias").read_bytes() == b"weights" and not (tmp_path / "out/m/alias").is_symlink()
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("x: 1\n")
    (folder / "leak").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeSubmissionError, match="points outside"):
        unpack(folder, tmp_path / "out2")
    (folder / "leak").unlink()
    os.mkfifo(folder / "pipe")
    with pytest.raises(UnsafeSubmissionError, match="FIFO"):
        unpack(folder, tmp_path / "out3")


# ------------------------------------------------------------------------------------ the home
@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path / "hidden", n_mc=6, n_gen=4)


def test_init_writes_inputs_without_targets_and_the_settings(tmp_path, tasks):
    # as a shell passes `--tasks hidden/*.csv`: the files one after the other
    assert main(["judge", "init", str(tmp_path / "home"), "--tasks", str(tasks[1]), str(tasks[0]),
                 "--budget", "60m", "--hardware", "a6000", "--per-round", "2", "--public", "0.5"]) == 0
    home = tmp_path / "home"
    comp = yaml.safe_load((home / "competition.yaml").read_text())
    assert comp["cutoff"] == "2024-05-31" and comp["max_params"] == 8_000_000_000 and comp["budget"] == "60m"
    assert comp["speed_factor"] == 1.0 and comp["submissions_per_round"] == 2 and comp["public_fraction"] == 0.5
    assert comp["tasks"] == ["gen", "mc"] and "apache-2.0" in comp["licences"]
    with open(home / "inputs" / "mc.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "input", "answer_choices", "eval_type"] and len(rows) == 6
    assert "target" not in (home / "inputs" / "gen.csv").read_text().splitlines()[0]
    assert (home / "secret" / "targets" / "mc.csv").read_bytes() == tasks[0].read_bytes()
    assert (home / "secret").stat().st_mode & 0o777 == 0o700
    assert (home / "secret" / "judge.sqlite").is_file()
    with pytest.raises(JudgeError, match="already a competition home"):
        init_home(home, tasks)
    # a quoted glob works too
    assert main(["judge", "init", str(tmp_path / "home2"), "--tasks", str(tmp_path / "hidden" / "*.csv")]) == 0
    assert yaml.safe_load((tmp_path / "home2" / "competition.yaml").read_text())["tasks"] == ["gen", "mc"]


def test_a_slower_judge_gets_a_longer_limit(tmp_path, tasks):
    cpu = init_home(tmp_path / "cpu", tasks, budget="60m", hardware="cpu").load()
    a6000 = init_home(tmp_path / "ref", tasks, budget="60m").load()
    assert a6000.time_limit_s == 3600
    assert cpu.speed_factor < 0.05 and cpu.time_limit_s == pytest.approx(3600 / cpu.speed_factor)


def test_calibrate_measures_the_judge_against_the_a6000(tmp_path, tasks):
    comp = init_home(tmp_path / "cal", tasks, budget="60m", hardware="cpu", calibrate_here=True).load()
    assert comp.judge_hardware == "cpu+calibrated" and 0 < comp.speed_factor < 1
    assert comp.time_limit_s == pytest.approx(3600 / comp.speed_factor)


def test_public_split_is_a_hash_of_the_row_id():
    import hashlib

    h = int(hashlib.sha256(b"mc/m3").hexdigest()[:8], 16) / 16 ** 8
    assert is_public("mc", "m3", h + 1e-9) and not is_public("mc", "m3", h)
    share = sum(is_public("t", str(i), 0.3) for i in range(4000)) / 4000
    assert 0.27 < share < 0.33


# ------------------------------------------------------------------------------------ intake
def weights(n: int) -> bytes:
    return safetensors_header({"model.embed_tokens.weight": ("BF16", [n // 1000, 1000])})


REPOS = [
    Repo("org/ok", [Commit({"model.safetensors": weights(10**9), "config.json": b"{}"}, date="2024-03-01")],
         card_data={"license": "apache-2.0"}),
    Repo("org/late", [Commit({"model.safetensors": weights(10**9)}, date="2024-08-01")],
         card_data={"license": "apache-2.0"}),
    Repo("org/huge", [Commit({"model.safetensors": weights(70 * 10**9)}, date="2024-01-01")],
         card_data={"license": "apache-2.0"}),
    Repo("org/closed", [Commit({"model.safetensors": weights(10**9)}, date="2024-01-01")],
         card_data={"license": "cc-by-nc-4.0"}),
]


def sha(repo: str) -> str:
    return next(r for r in REPOS if r.repo_id == repo).commits[-1].sha


def sub(tmp_path: Path, name: str, recipe: dict, files: dict[str, str] | None = None) -> Path:
    folder = tmp_path / "subs" / name
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def test_intake_rejects_with_reasons_and_never_drops(tmp_path, tasks, monkeypatch, capsys):
    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "5")
    home = init_home(tmp_path / "home", tasks, submissions_per_round=3)
    ok = {"model": "org/ok", "revision": sha("org/ok")}
    cases = {
        "unpinned": ({"base": {"model": "org/ok", "revision": "main"}, "experts": [ok],
                      "method": {"name": "linear"}}, "must be pinned to a 40-hex commit"),
        "late": ({"base": ok, "experts": [{"model": "org/late", "revision": sha("org/late")}],
                  "method": {"name": "linear"}}, "after the cut-off"),
        "huge": ({"base": ok, "experts": [{"model": "org/huge", "revision": sha("org/huge")}],
                  "method": {"name": "linear"}}, "more than 8B"),
        "closed": ({"base": ok, "experts": [{"model": "org/closed", "revision": sha("org/closed")}],
                    "method": {"name": "linear"}}, "cc-by-nc-4.0 is not on the competition's list"),
        "outside": ({"base": ok, "experts": [{"path": "../../elsewhere"}], "method": {"name": "linear"}},
                    "is not a folder inside the submission"),
        "badmethod": ({"base": ok, "experts": [ok], "method": {"name": "nonsense"}}, "does not parse"),
        "data": ({"base": ok, "experts": [ok], "method": {"name": "linear"},
                  "finetune": {"data": [{"path": "d.csv", "licence": "proprietary"}]}}, "licen"),
    }
    with HubSim(REPOS) as hub, hub.environ(cache_dir=tmp_path / "cache"):
        for name, (recipe, why) in cases.items():
            files = {"d.csv": "id,input,target,answer_choices,eval_type\n1,a,b,,generation\n"}
            receipt = submit(home.root, sub(tmp_path, name, recipe, files), "team-" + name)
            assert receipt.status == "rejected", name
            assert any(why in r for r in receipt.reasons), (name, receipt.reasons)
        good = sub(tmp_path, "good", {"base": ok, "experts": [ok], "method": {"name": "linear"}})
        assert main(["judge", "submit", str(home.root), str(good), "--team", "blue"]) == 0
        out = capsys.readouterr().out
        assert "status:   received" in out and "team:     blue" in out
        again = submit(home.root, good, "blue")
        assert again.duplicate and again.status == "received"
        # the Hub snapshot was fetched into the home's cache at intake (judged runs are offline)
        assert any((home.hub_cache).rglob("model.safetensors"))
        for i in range(2):
            submit(home.root, sub(tmp_path, f"more{i}", {"base": ok, "experts": [ok],
                                                          "method": {"name": "linear"}, "seed": i}), "blue")
        with pytest.raises(JudgeError, match="at most 3 per round"):
            submit(home.root, sub(tmp_path, "toomany", {"base": ok, "experts": [ok], "method": {"name": "linear"},
                                                        "seed": 9}), "blue")
    conn = connect(home.database)
    rows = {r["team"]: (r["status"], json.loads(r["reasons"])) for r in conn.execute("SELECT * FROM submissions")}
    conn.close()
    assert {t for t, (s, _) in rows.items() if s == "rejected"} == {f"team-{n}" for n in cases}
    assert len(rows) == len(cases) + 1      # blue: one row per team here, 3 submissions
    assert (home.store / receipt.content / "recipe.yaml").is_file()  # a rejected submission is stored too


# ------------------------------------------------------------------------------------ scoring
def test_scores_against_hand_computation_public_and_private_apart(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "t.csv").write_text(
        "id,input,target,answer_choices,eval_type\n"
        "a,q,0,\"[\"\"x\"\", \"\"y\"\"]\",multiple_choice\n"
        "b,q,1,\"[\"\"x\"\", \"\"y\"\"]\",multiple_choice\n"
        "c,q,2,\"[\"\"x\"\", \"\"y\"\", \"\"z\"\"]\",multiple_choice\n"
        "d,q,the cat sat,,generation\n")
    home = init_home(tmp_path / "home", [hidden / "t.csv"], public_fraction=0.5)
    public = {r: is_public("t", r, 0.5) for r in "abcd"}
    preds = {"t": {"a": "0", "b": "0", "c": "2", "d": "cat sat"}}
    s = score(home, ["t"], 0.5, preds)
    # per row: a right (1), b wrong (0), c right (1), d ROUGE-L F of "cat sat" vs "the cat sat" = 0.8
    per_row = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.8}
    for part, flag in (("public", True), ("private", False)):
        vals = [v for r, v in per_row.items() if public[r] == flag]
        assert s.tasks["t"][part] == pytest.approx(sum(vals) / len(vals) if vals else None)
        assert s.tasks["t"][f"{part}_rows"] == len(vals)
    assert s.public == s.tasks["t"]["public"] and s.private == s.tasks["t"]["private"]
    assert sorted(s.rows)[3] == ("t", "d", "cat sat", 1.0)       # exact match after normalisation ("the" goes)
    # garbage outputs are refused, naming the problem
    run = tmp_path / "eval"
    run.mkdir()
    for text, why in (("id,prediction,dummy_field\na,0,0\nb,0,0\nc,5,0\nd,x,0\n", "not a choice index"),
                      ("id,prediction,dummy_field\na,0,0\na,0,0\n", "appears twice"),
                      ("id,prediction,dummy_field\na,0,0\n", "missing"),
                      ("nonsense\n", "header")):
        (run / "t.csv").write_text(text)
        with pytest.raises(GarbageOutput, match=why):
            read_predictions(run, home.inputs, ["t"])
    (run / "t.csv").write_text("id,prediction,dummy_field\na,0,0\nb,1,0\nc,2,0\nd,\"two\nlines\",0\n")
    assert read_predictions(run, home.inputs, ["t"])["t"]["d"] == "two\nlines"


# ------------------------------------------------------------------------------------ similarity
def test_expected_agreement_of_independent_models():
    # both right (0.6*0.5), or both wrong (0.4*0.5) on the same one of 3 wrong choices (1/3)
    assert expected_agreement(0.6, 0.5, 4) == pytest.approx(0.30 + 0.20 / 3)
    assert expected_agreement(0.6, 0.5, 2) == pytest.approx(0.30 + 0.20)
    assert expected_agreement(0.6, 0.5, None) == pytest.approx(0.30)


def test_recipe_equivalence_within_tolerance():
    a = {"base": {"model": "b"}, "experts": [{"model": "x", "weight": 0.6}, {"model": "y", "weight": 0.4}],
         "method": {"name": "ties", "density": 0.5}, "seed": 1, "eval": {"data": ["p"], "batch_size": 8}}
    ids = {"base": "b@1", "expert 1": "x@1", "expert 2": "y@1"}
    b = json.loads(json.dumps(a))
    b["experts"] = [b["experts"][1] | {"weight": 0.39}, b["experts"][0] | {"weight": 0.61}]   # reordered
    b["seed"], b["eval"]["data"] = 7, ["q"]
    ids_b = {"base": "b@1", "expert 1": "y@1", "expert 2": "x@1"}
    assert recipe_equivalent(a, ids, b, ids_b, 0.05)[0]
    c = json.loads(json.dumps(b))
    c["method"]["density"] = 0.7
    assert recipe_equivalent(a, ids, c, ids_b, 0.05) == (False, "method differs")
    assert recipe_equivalent(a, ids, b, {**ids_b, "expert 1": "z@1"}, 0.05) == (False, "different experts")


def test_fingerprint_cosine_follows_the_task_vectors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=g), "v": torch.randn(300, generator=g)}
    d1 = {k: torch.randn(t.shape, generator=g) for k, t in base.items()}
    d2 = {k: torch.randn(t.shape, generator=g) for k, t in base.items()}
    folders = {}
    for name, state in {"base": base, "m1": {k: base[k] + d1[k] for k in base},
                        "m1b": {k: base[k] + 1.01 * d1[k] + 0.05 * d2[k] for k in base},
                        "m2": {k: base[k] + d2[k] for k in base}}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        save_file(state, str(folders[name] / "model.safetensors"))
    f = {n: task_vector_sketch(folders[n], folders["base"]) for n in ("m1", "m1b", "m2")}
    true = torch.nn.functional.cosine_similarity(
        torch.cat([d1[k].flatten() for k in sorted(base)]),
        torch.cat([(1.01 * d1[k] + 0.05 * d2[k]).flatten() for k in sorted(base)]), dim=0).item()
    assert cosine(f["m1"], f["m1b"]) == pytest.approx(true, abs=0.02) and true > 0.99
    assert abs(cosine(f["m1"], f["m2"])) < 0.15            # independent task vectors: near orthogonal
    assert task_vector_sketch(folders["m1"], folders["base"]) == f["m1"]   # fixed projection


# ------------------------------------------------------------------------------------ sandbox
needs_ns = pytest.mark.skipif(not namespaces_available(), reason="unshare -rnm is not available here")


@needs_ns
def test_sandbox_hides_the_secrets_and_the_network(tmp_path):
    root = tmp_path / "home"
    for d in ("secret", "store", "scratch/other"):
        (root / d).mkdir(parents=True)
    (root / "secret" / "targets.csv").write_text("answers")
    (root / "scratch" / "other" / "p.csv").write_text("theirs")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = (f"import socket\nfor p in {[str(root / 'secret/targets.csv'), str(root / 'scratch/other/p.csv')]!r}:\n"
            f"    try: open(p).read(); print('READ', p)\n    except OSError as e: print('hidden', type(e).__name__)\n"
            f"try: socket.create_connection(('127.0.0.1', {port}), timeout=2); print('CONNECTED')\n"
            f"except OSError as e: print('offline', type(e).__name__)\nopen('mine.txt', 'w').write('ok')\n")
    out = run_limited([sys.executable, "-c", code], scratch=root / "scratch" / "me", time_limit_s=30,
                      memory_bytes=None, env=dict(os.environ), hide=(root / "store",), secret=root / "secret",
                      scratch_root=root / "scratch")
    server.close()
    assert out.returncode == 0, out.log_tail
    assert out.log_tail.count("hidden FileNotFoundError") == 2 and "\nREAD " not in out.log_tail
    assert "\noffline OSError" in out.log_tail and "\nCONNECTED" not in out.log_tail
    assert (root / "scratch" / "me" / "mine.txt").read_text() == "ok"      # its own folder is writable
    assert (root / "secret" / "targets.csv").read_text() == "answers"      # nothing changed outside
    assert "network namespace" in out.isolation["network"]


def test_sandbox_kills_at_the_limit_and_caps_memory(tmp_path):
    slow = run_limited([sys.executable, "-c", "import time; time.sleep(60)"], scratch=tmp_path / "a",
                       time_limit_s=1.0, memory_bytes=None, env=dict(os.environ))
    assert slow.timed_out and 1.0 <= slow.wall_s < 5 and slow.returncode == -9
    big = run_limited([sys.executable, "-c", "x = bytearray(3 << 30)"], scratch=tmp_path / "b", time_limit_s=30,
                      memory_bytes=1 << 30, env=dict(os.environ))
    assert big.returncode == 1 and "MemoryError" in big.log_tail and not big.timed_out
    small = run_limited([sys.executable, "-c", "import time; x = bytearray(200 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(0.5)"],
                        scratch=tmp_path / "c", time_limit_s=30, memory_bytes=None, env=dict(os.environ))
    assert small.returncode == 0 and 200 < small.peak_mem_mb < 400


# ------------------------------------------------------------------------------------ commands
def test_command_errors_are_one_message_and_an_empty_round_is_no_round(tmp_path, tasks, capsys):
    assert main(["judge", "leaderboard", str(tmp_path / "nowhere")]) == 2
    assert "is not a competition home" in " ".join(capsys.readouterr().err.split())   # rich wraps lines
    home = init_home(tmp_path / "home", tasks)
    assert main(["judge", "round", str(home.root)]) == 0
    assert capsys.readouterr().out == "nothing to judge\n"
    assert main(["judge", "round", str(home.root), "--backend", "slurm"]) == 2
    assert "unknown backend 'slurm'" in " ".join(capsys.readouterr().err.split())


def test_a_run_the_judge_cannot_even_start_is_a_recorded_failure(tmp_path, tasks, capsys):
    """A submission whose stored files vanished: the round records `failed` and goes on."""
    home = init_home(tmp_path / "home", tasks)
    folder = sub(tmp_path, "local", {"base": {"path": "m"}, "experts": [{"path": "m"}],
                                     "method": {"name": "linear"}})
    make_base("llama", folder / "m", hidden=32, layers=1)
    receipt = submit(home.root, folder, "solo")
    assert receipt.status == "received", receipt.reasons
    shutil.rmtree(home.store / receipt.content)
    report = run_round(home.root)
    assert [(j["team"], j["status"]) for j in report.judged] == [("solo", "failed")]
    conn = connect(home.database)
    detail = conn.execute("SELECT detail FROM results").fetchone()[0]
    conn.close()
    assert detail.startswith("the judge could not run it: FileNotFoundError")


def test_the_judged_recipe_drops_compare_base():
    """A submission's `eval.compare_base` would make the judge score the base too: it is dropped;
    the other evaluation options stay, and the data are the hidden inputs."""
    from mergelab.judge.intake import judged_recipe

    recipe = {"method": {"name": "linear"}, "eval": {"data": ["mine.csv"], "compare_base": True, "batch_size": 2}}
    assert judged_recipe(recipe, [Path("/hidden/t.csv")])["eval"] == {"data": ["/hidden/t.csv"], "batch_size": 2}
    assert recipe["eval"]["compare_base"] is True   # the submission's own recipe is left as it was
