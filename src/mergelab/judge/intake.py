"""``judge submit``: validate a submission, store it content-addressed, record it, print a receipt.

A submission is a folder or a ``.tar.gz`` holding ``recipe.yaml`` and the local files it names.
Checks, in order: safe unpacking (:mod:`.archive`), the recipe parses (with the hidden inputs in
place of its own ``eval.data``), every model is a Hub reference pinned to a 40-hex commit or a
folder inside the submission, the competition rules pass for every Hub model (cut-off, size,
licence list of ``competition.yaml``), fine-tuning data licences are allowed. A submission that
fails a check is stored as ``rejected`` with every reason; one whose archive is unsafe is
recorded as ``rejected`` with nothing unpacked. Hub snapshots are fetched here, into the home's
Hub cache, so that judged runs need no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import MergelabError, RecipeError, ShapeMismatchError
from mergelab.finetune.train import check_data_licences
from mergelab.judge.archive import Caps, UnsafeSubmissionError, unpack
from mergelab.judge.db import connect, transaction
from mergelab.judge.home import Competition, Home, JudgeError
from mergelab.run.manifest import fingerprint, hash_tree, now_iso
from mergelab.util import sha256_file
from mergelab.hub.rules import check_models, recipe_stack
from mergelab.recipe import read_recipe
from mergelab.hub.sources import resolve_ref

RECIPE_NAME = "recipe.yaml"
JUDGED_RECIPE = "recipe.judged.yaml"
_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass
class Receipt:
    id: str
    team: str
    received: str
    status: str                     # received | rejected
    content: str                    # sha256 of the files (the store folder's name)
    reasons: list[str] = field(default_factory=list)
    duplicate: bool = False

    def text(self) -> str:
        lines = [f"submission {self.id}", f"  team:     {self.team}", f"  received: {self.received}",
                 f"  status:   {self.status}" + (" (already received)" if self.duplicate else "")]
        lines += [f"  reason:   {r}" for r in self.reasons]
        return "\n".join(lines)


def content_hash(folder: Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of a folder."""
    return fingerprint(hash_tree(folder))


def judged_recipe(recipe: dict, inputs: list[Path]) -> dict:
    """The recipe a judged run executes: the submission's, with ``eval.data`` = the hidden inputs."""
    out = dict(recipe)
    section = dict(out.get("eval") or {})
    section["data"] = [str(p) for p in inputs]
    section.pop("compare_base", None)   # the judge scores submissions; scoring their base is not its work
    out["eval"] = section
    return out


def model_entries(recipe: dict) -> list[tuple[str, Any]]:
    entries = [("base", recipe.get("base"))] if recipe.get("base") is not None else []
    entries += [(f"expert {i}", e) for i, e in enumerate(recipe.get("experts") or [], 1)]
    slices = recipe.get("slices")   # a layer stack names its models in its slices
    return entries + [(f"slice {i}", e) for i, e in enumerate(slices if isinstance(slices, list) else [], 1)]


def check_submission(folder: Path, comp: Competition, home: Home) -> tuple[list[str], dict, dict]:
    """``(reasons, recipe, model identities)`` of an unpacked submission; no reasons = accepted."""
    path = folder / RECIPE_NAME
    if not path.is_file():
        return [f"no {RECIPE_NAME} at the top of the submission"], {}, {}
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return [f"{RECIPE_NAME} is not YAML: {exc}"], {}, {}
    if not isinstance(recipe, dict):
        return [f"{RECIPE_NAME} is not a mapping"], {}, {}
    reasons: list[str] = []
    identities: dict[str, str] = {}
    hub_refs = []
    root = folder.resolve()
    for role, entry in model_entries(recipe):
        if not isinstance(entry, dict):
            reasons.append(f"{role}: not a model reference ({entry!r})")
            continue
        if entry.get("model") is not None:
            rev = str(entry.get("revision") or "")
            if not _SHA.fullmatch(rev):
                reasons.append(f"{role}: {entry['model']} must be pinned to a 40-hex commit sha "
                               f"(revision: {rev or 'none'})")
                continue
            hub_refs.append((role, entry))
            identities[role] = f"{entry['model']}@{rev}"
        elif entry.get("path") is not None:
            p = Path(str(entry["path"]))
            target = (root / p).resolve()
            if p.is_absolute() or not str(target).startswith(str(root) + os.sep) or not target.is_dir():
                reasons.append(f"{role}: path {entry['path']!r} is not a folder inside the submission")
                continue
            identities[role] = "sha256:" + content_hash(target)
        else:
            reasons.append(f"{role}: names neither `model` (with a pinned revision) nor `path`")
    inputs = [home.inputs / f"{t}.csv" for t in comp.tasks]
    stack = None   # a layer stack's slices: the stacked result must keep the size limit too
    try:
        doc = read_recipe(judged_recipe(recipe, inputs), base_dir=folder)
        finetune, stack = doc.finetune, recipe_stack(doc.recipe)
    except MergelabError as exc:
        reasons.append(f"the recipe does not parse: {exc.message}")
        finetune = None
    if finetune is not None:
        try:
            records = check_data_licences(finetune, rules=True)
            for r in records:
                if str(r["licence"]).lower() not in comp.licences:
                    reasons.append(f"fine-tuning data {Path(r['path']).name}: licence {r['licence']} "
                                   "is not on the competition's list")
                if not str(Path(r["path"]).resolve()).startswith(str(root) + os.sep):
                    reasons.append(f"fine-tuning data {r['path']} is not a file inside the submission")
        except MergelabError as exc:
            reasons.append(exc.message)
    if (hub_refs or stack) and not reasons:
        try:
            report = check_models(hub_refs, cutoff=comp.cutoff, max_params=comp.max_params, stack=stack)
        except (RecipeError, ShapeMismatchError) as exc:   # a layer range or a layer its model does not have
            reasons.append(f"the layer stack: {exc.message}")
            report = None
        for f in report.failures if report is not None else []:
            reasons.append(f"{f.model} ({f.role}) {f.rule}: {f.reason}")
        for m in report.models if report is not None else []:
            lic = m.get("licence")
            lic = lic[0] if isinstance(lic, list) and len(lic) == 1 else lic
            if m.get("source") == "hub" and str(lic).lower() not in comp.licences:
                reasons.append(f"{m['model']} ({m['role']}) licence: {lic or 'none'} is not on the "
                               "competition's list")
    if hub_refs and not reasons:        # fetch now: judged runs are offline
        for role, entry in hub_refs:
            try:
                resolve_ref(entry, cache_dir=home.hub_cache, cutoff=comp.cutoff)
            except MergelabError as exc:
                reasons.append(f"{role}: cannot fetch {entry['model']}: {exc.message}")
    return reasons, recipe, identities


def submit(root: str | Path, submission: str | Path, team: str) -> Receipt:
    """Validate and store one submission (see the module doc); returns the receipt."""
    home = Home(Path(root).resolve())      # the judged recipe names the inputs by absolute path
    comp = home.load()
    team = team.strip()
    if not team:
        raise JudgeError("a submission needs a team name (--team)")
    conn = connect(home.database)
    try:
        if comp.submissions_per_round is not None:
            n = conn.execute("SELECT COUNT(*) FROM submissions WHERE team = ? AND round IS NULL AND status = "
                             "'received'", (team,)).fetchone()[0]
            if n >= comp.submissions_per_round:
                raise JudgeError(f"team {team} already has {n} submission(s) waiting for the next round "
                                 f"(at most {comp.submissions_per_round} per round)",
                                 hint="submit again after the next round")
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=home.store))
        caps = Caps(comp.archive_max_bytes, comp.archive_max_files, comp.archive_max_ratio)
        try:
            try:
                unpack(submission, staging / "x", caps)
            except UnsafeSubmissionError as exc:
                digest = (sha256_file(submission) if Path(submission).is_file()
                          else hashlib.sha256(str(Path(submission).resolve()).encode()).hexdigest())
                return _record(conn, team, digest, "rejected", [exc.message], {}, {})
            folder = staging / "x"
            tops = list(folder.iterdir())
            if not (folder / RECIPE_NAME).exists() and len(tops) == 1 and (tops[0] / RECIPE_NAME).is_file():
                folder = tops[0]            # an archive of one folder
            content = content_hash(folder)
            final = home.store / content
            if not final.exists():
                try:
                    folder.rename(final)
                except OSError:          # the same files arrived at the same moment: one copy is kept
                    if not final.is_dir():
                        raise
            reasons, recipe, identities = check_submission(final, comp, home)
            return _record(conn, team, content, "rejected" if reasons else "received", reasons, recipe,
                           identities)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        conn.close()


def _record(conn, team: str, content: str, status: str, reasons: list[str], recipe: dict,
            identities: dict) -> Receipt:
    sid = hashlib.sha256(f"{content}\n{team}".encode()).hexdigest()
    with transaction(conn):
        row = conn.execute("SELECT received, status, reasons FROM submissions WHERE id = ?", (sid,)).fetchone()
        if row is not None:
            return Receipt(sid, team, row["received"], row["status"], content, json.loads(row["reasons"]),
                           duplicate=True)
        received = now_iso()
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM submissions").fetchone()[0]
        conn.execute("INSERT INTO submissions (id, team, received, seq, status, reasons, recipe, models, content) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (sid, team, received, seq, status, json.dumps(reasons), json.dumps(recipe, default=str),
                      json.dumps(identities), content))
    return Receipt(sid, team, received, status, content, reasons)

