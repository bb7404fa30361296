"""A demo season of tiny submissions (tests and ``bench/judge_round.py``; the product never imports it).

:func:`build_season` writes tiny random models, publishes them on a local Hub imitation
(:class:`~mergelab.hubsim.HubSim`), writes two hidden tasks, and prepares eight submissions:

========  ======================================================================  ==============
team      submission                                                              expected
========  ======================================================================  ==============
alpha     DARE-TIES of experts 0 and 1 (Hub models pinned to commits)             scored
beta      alpha's recipe with weights 0.61/0.39 (a near copy), as a .tar.gz       scored, flagged
gamma     task arithmetic of expert 2 (an honest, independent entry)              scored
delta     fine-tunes for 10^6 steps                                               over_time
epsilon   merges an expert of another width (inside the submission): crashes      failed
zeta      names a model uploaded after the cut-off                                rejected
eta       an archive with ``../`` and a link to /etc/passwd                       rejected
theta     draws few-shot examples from the judge's hidden targets file            failed
========  ======================================================================  ==============
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergelab.testing.hubsim import Commit, Repo, files_from_folder
from mergelab.testing import make_base, make_expert

APACHE = {"license": "apache-2.0"}
WORDS = ["A", "B", "C", "D", "0", "1", "2", "3", "x", "y", "+", "="]   # one token each: no length bias
TOPICS = ["Sentiment", "Translate", "Dates", "Question", "Merging"]


@dataclass
class Season:
    root: Path
    repos: list[Repo]
    tasks: list[Path]
    submissions: list[tuple[str, Path]] = field(default_factory=list)     # (team, folder or archive)
    sha: dict[str, str] = field(default_factory=dict)
    gamma: dict = field(default_factory=dict)

    def for_home(self, home: Path) -> list[tuple[str, Path]]:
        """The eight submissions, theta's pointing at ``home``'s secret targets."""
        return [(t, reads_targets(self, home) if t == "theta" else p) for t, p in self.submissions]


def write_tasks(folder: Path, n_mc: int = 16, n_gen: int = 6) -> list[Path]:
    """Two hidden tasks with targets: ``mc`` (multiple choice) and ``gen`` (generation)."""
    folder.mkdir(parents=True, exist_ok=True)
    mc, gen = folder / "mc.csv", folder / "gen.csv"
    with open(mc, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n_mc):
            words = WORDS[i % len(WORDS):] + WORDS[:i % len(WORDS)]
            ch = words[:2 + i % 3]
            w.writerow([f"m{i}", f"{TOPICS[i % len(TOPICS)]} {i}: which {ch[i % len(ch)]}?", str(i % len(ch)),
                        json.dumps(ch), "multiple_choice"])
    with open(gen, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n_gen):
            w.writerow([f"g{i}", f"Count to {i}:", " ".join(str(j) for j in range(i + 1)), "", "generation"])
    return [mc, gen]


def _recipe(folder: Path, recipe: dict, extra: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    return folder


def _tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=".")
    return out


def malicious_archive(out: Path, recipe_text: str) -> Path:
    """A .tar.gz with a harmless recipe, a ``../`` member and a symlink to /etc/passwd."""
    with tarfile.open(out, "w:gz") as tf:
        for name, data in (("recipe.yaml", recipe_text.encode()), ("../escaped.txt", b"pwned")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    return out


def build_season(root: str | Path, *, home: str | Path | None = None) -> Season:
    """Models, Hub repositories, hidden tasks and the eight submissions (see the module doc).

    ``home`` is the competition home the submissions will be judged in (theta names its secret
    targets file by absolute path)."""
    root = Path(root)
    models = root / "models"
    base = make_base("llama", models / "base", seed=3, hidden=32, layers=2)
    experts = [make_expert(base, models / f"e{i}", seed=40 + i, scale=0.3) for i in range(3)]
    wide = make_base("llama", models / "wide", seed=5, hidden=48, layers=2)
    repos = [Repo("org/base", [Commit(files_from_folder(base), date="2024-03-01T00:00:00Z")], card_data=APACHE)]
    for i, e in enumerate(experts):
        repos.append(Repo(f"org/expert{i}", [Commit(files_from_folder(e), date=f"2024-04-0{i + 1}T00:00:00Z")],
                          card_data=APACHE))
    repos.append(Repo("late/expert", [Commit(files_from_folder(experts[0]), date="2024-07-01T00:00:00Z")],
                      card_data=APACHE))
    sha = {r.repo_id: r.commits[-1].sha for r in repos}
    season = Season(root, repos, write_tasks(root / "hidden"), sha=sha)
    ref = lambda repo, **kw: {"model": repo, "revision": sha[repo], **kw}   # noqa: E731
    eval_opts = {"max_new_tokens": 4, "batch_size": 8}
    subs = root / "submissions"
    alpha = {"base": ref("org/base"), "experts": [ref("org/expert0", weight=0.6), ref("org/expert1", weight=0.4)],
             "method": {"name": "dare_ties", "density": 0.5}, "seed": 1, "eval": eval_opts}
    season.submissions.append(("alpha", _recipe(subs / "alpha", alpha)))
    beta = json.loads(json.dumps(alpha))
    beta["experts"][0]["weight"], beta["experts"][1]["weight"] = 0.61, 0.39
    season.submissions.append(("beta", _tar(_recipe(subs / "beta", beta), subs / "beta.tar.gz")))
    gamma = {"base": ref("org/base"), "experts": [ref("org/expert2", weight=1.0)],
             "method": {"name": "task_arithmetic"}, "seed": 2, "eval": eval_opts}
    season.submissions.append(("gamma", _recipe(subs / "gamma", gamma)))
    train = "id,input,target,answer_choices,eval_type\n" + "".join(
        f"t{i},Say {i},{i},,generation\n" for i in range(8))
    delta = {**alpha, "finetune": {"data": [{"path": "train.csv", "licence": "cc-by-4.0"}], "steps": 1_000_000,
                                    "batch_size": 2, "max_length": 32, "target_modules": ["q_proj", "v_proj"]}}
    season.submissions.append(("delta", _recipe(subs / "delta", delta, {"train.csv": train})))
    eps = subs / "epsilon"
    _recipe(eps, {"base": ref("org/base"), "experts": [{"path": "wide", "weight": 1.0}],
                  "method": {"name": "task_arithmetic"}, "eval": eval_opts})
    shutil.copytree(wide, eps / "wide")
    season.submissions.append(("epsilon", eps))
    zeta = {"base": ref("org/base"), "experts": [ref("late/expert", weight=1.0)],
            "method": {"name": "task_arithmetic"}, "eval": eval_opts}
    season.submissions.append(("zeta", _recipe(subs / "zeta", zeta)))
    season.submissions.append(("eta", malicious_archive(subs / "eta.tar.gz", yaml.safe_dump(gamma))))
    season.gamma = gamma
    season.submissions.append(("theta", reads_targets(season, Path(home) if home else root / "home")))
    return season


def reads_targets(season: Season, home: Path) -> Path:
    """Theta's submission for ``home``: gamma's recipe drawing few-shot examples from the file of
    hidden targets of that home (which a judged run must not be able to read)."""
    secret = Path(home).resolve() / "secret" / "targets" / "mc.csv"
    theta = {**season.gamma, "eval": {**season.gamma["eval"], "few_shot": 1, "shots": str(secret)}}
    folder = season.root / "submissions" / f"theta-{hashlib.sha256(str(secret).encode()).hexdigest()[:8]}"
    return _recipe(folder, theta)
