"""Model cards: the ``README.md`` of every merge output, as the Hugging Face Hub reads it.

The YAML front matter puts the merge in its inputs' "model tree" on the Hub::

    base_model: [org/base, org/expert]   # every input that is a Hub repo (repo ids only)
    base_model_relation: merge
    library_name: transformers           # peft for an adapter (output.format: lora)
    license: apache-2.0                  # derived from the inputs' licences
    tags: [merge, mergelab, ties]

and the body says what the merge is: its inputs (Hub repos with their pinned commit, local
folders by path, each with its licence), the method with its paper (from the method's docstring),
the recipe as YAML, the rule check when one ran and the scores when ``mergelab run`` evaluated.

**Licence.** Each input's licence is read from its folder's ``README.md`` front matter
(``license:``, or ``license_name:`` for ``other``) or, for a Hub repo, from the Hub's model info
(the card data :mod:`mergelab.hub.sources` reads; the rule check records it too). One licence
shared by every input that has one becomes the card's; none becomes ``unknown``; two or more
different licences become ``other`` (``license_name: mixed``) and a **warning**, written in the
card and returned to the caller (``merge(..., warn=)``): a merge is bound by every input's terms.

**Deterministic bytes.** No timestamps, no output path, no Hub endpoint; YAML with sorted keys;
scores with fixed decimals. The same recipe and inputs give the same card, so reruns and
``mergelab reproduce`` stay byte-identical.

A Hub input is recognised by its recipe entry (``model:``) or by its folder being a snapshot of the
Hub cache (``…/models--org--name/snapshots/<commit>``, what ``mergelab run`` merges from).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from mergelab.errors import SourceError
from mergelab.hub.sources import HubClient, card_licence
from mergelab.methods import get_method

__all__ = ["CARD_NAME", "CardInput", "card_inputs", "derive_licence", "hub_snapshot", "inputs_from_records",
           "read_front_matter", "render_card", "write_card", "write_merge_card"]

CARD_NAME = "README.md"
HUB_URL = "https://huggingface.co"
_SNAPSHOT = re.compile(r"models--(?P<repo>.+)/snapshots/(?P<sha>[0-9a-f]{40})$")
_ARXIV = re.compile(r"arXiv:\s*(\d{4}\.\d{4,5})")


@dataclass(frozen=True)
class CardInput:
    """One input model as the card names it: a Hub repo at a commit, or a local folder."""

    role: str                      # "base", "expert 1", ...
    repo: str | None = None        # Hub repo id
    revision: str | None = None    # the pinned commit (or the revision asked for, when no commit is known)
    path: str | None = None        # a local folder that is not a Hub snapshot
    license: str | None = None     # None: unknown
    license_from: str = ""         # where the licence was read ("README.md", "the Hub", ...)


def hub_snapshot(folder: str | Path | None) -> tuple[str, str] | None:
    """``(repo id, commit)`` when ``folder`` is a snapshot of the Hub cache, else None."""
    if folder is None:
        return None
    match = _SNAPSHOT.search(Path(folder).as_posix())
    if not match or "/" in match["repo"]:
        return None
    return match["repo"].replace("--", "/", 1), match["sha"]


def read_front_matter(readme: str | Path) -> dict:
    """The YAML front matter of a model card file ({} when it has none or it cannot be read)."""
    try:
        text = Path(readme).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    parts = text.split("---", 2)
    if not text.startswith("---") or len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_licence(client_factory: Callable[[], HubClient] = HubClient) -> Callable[[str, str], str | None]:
    """A look-up ``(repo, revision) → licence`` through the Hub's model info (None when it cannot answer)."""
    client: list[HubClient] = []

    def look_up(repo: str, revision: str) -> str | None:
        try:
            if not client:
                client.append(client_factory())
            return card_licence(client[0].model(repo, revision).card)
        except SourceError:
            return None
    return look_up


def _input_models(recipe) -> list[tuple[str, Any]]:
    """``[(role, model)]`` after the base: the experts, or a layer stack's models (each once)."""
    if getattr(recipe, "slices", None) is not None:
        return recipe.stack_models()
    return [(f"expert {i}", ref) for i, ref in enumerate(recipe.experts, 1)]


def card_inputs(recipe, base_path: str | Path, expert_paths: Sequence[str | Path], *,
                licence: Callable[[str, str], str | None] | None = None,
                known: Mapping[str, str | None] | None = None) -> list[CardInput]:
    """The card's view of a recipe's inputs (``base_path``/``expert_paths``: their local folders;
    for a layer stack, those of :meth:`~mergelab.recipe.Recipe.stack_models`).

    ``licence(repo, commit)`` is asked for Hub inputs whose folder has no ``README.md`` licence
    (the Hub cache keeps no README); ``known`` maps a repo id to a licence already known (e.g. from
    the rule check), which is used first.
    """
    refs = [("base", recipe.base, base_path)] + [
        (role, ref, path) for (role, ref), path in zip(_input_models(recipe), expert_paths)]
    out = []
    for role, ref, folder in refs:
        snapshot = hub_snapshot(folder)
        repo = getattr(ref, "model", None) or (snapshot[0] if snapshot else None)
        revision = snapshot[1] if snapshot else getattr(ref, "revision", None)
        lic = card_licence(read_front_matter(Path(folder) / CARD_NAME)) if folder else None
        source = "its README.md" if lic else ""
        if lic is None and repo is not None:
            if known and repo in known:
                lic, source = known[repo], "the Hub (rule check)"
            elif licence is not None and revision:
                lic, source = licence(repo, revision), "the Hub"
            source = source if lic else ""
        if repo is not None:
            out.append(CardInput(role, repo=repo, revision=revision, license=lic, license_from=source))
        else:
            out.append(CardInput(role, path=str(folder), license=lic, license_from=source))
    return out


def inputs_from_records(models: Sequence[Mapping[str, Any]]) -> list[CardInput]:
    """The card's inputs from a run manifest's ``models`` records (role, source, repo, commit_sha,
    local_path, license): a Hub model by repo and commit with the Hub's licence, a local folder by
    path with its README.md licence."""
    out = []
    for m in models:
        folder = m.get("local_path")
        lic = card_licence(read_front_matter(Path(folder) / CARD_NAME)) if folder else None
        source = "its README.md" if lic else ""
        if m.get("source") == "hub":
            if lic is None and m.get("license"):
                lic, source = m["license"], "the Hub"
            out.append(CardInput(m["role"], repo=m.get("repo"), revision=m.get("commit_sha"), license=lic,
                                 license_from=source))
        else:
            out.append(CardInput(m["role"], path=folder, license=lic, license_from=source))
    return out


def derive_licence(inputs: Iterable[CardInput]) -> tuple[str, list[str]]:
    """``(licence id for the front matter, warnings)`` from the inputs' licences.

    One licence among the inputs that state one → that licence; none → ``unknown``; several →
    ``other`` and a warning naming each input's licence.
    """
    inputs = list(inputs)
    found = sorted({i.license for i in inputs if i.license})
    if not found:
        return "unknown", []
    if len(found) == 1:
        return found[0], []
    each = "; ".join(f"{i.role} {_name(i)}: {i.license or 'unknown'}" for i in inputs)
    return "other", [f"the inputs' licences conflict ({', '.join(found)}): a merge is bound by the terms of every "
                     f"input; check that they are compatible before you share it ({each})"]


def _name(i: CardInput) -> str:
    return f"{i.repo}@{i.revision[:12]}" if i.repo and i.revision else (i.repo or str(i.path))


def _front_matter(inputs: Sequence[CardInput], method: str, output_format: str, licence: str) -> str:
    from huggingface_hub import ModelCardData

    repos = list(dict.fromkeys(i.repo for i in inputs if i.repo))
    extra: dict[str, Any] = {"base_model_relation": "merge"}
    if licence == "other":
        extra["license_name"] = "mixed"
    data = ModelCardData(base_model=repos or None, library_name="peft" if output_format == "lora" else "transformers",
                         license=licence, tags=["merge", "mergelab", method], **extra).to_dict()
    return yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False)


def _method_section(method: str) -> list[str]:
    try:
        doc = get_method(method).doc
    except Exception:  # noqa: BLE001 - a card never fails the merge over a method's description
        doc = ""
    first = " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "`") if doc else ""
    lines = ["## Method", "", f"**{method}**" + (f": {first}" if first else "")]
    papers = list(dict.fromkeys(_ARXIV.findall(doc)))
    if papers:
        lines += ["", "Paper" + ("s" if len(papers) > 1 else "") + ": "
                  + ", ".join(f"[arXiv:{p}](https://arxiv.org/abs/{p})" for p in papers)]
    return lines + [""]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rules_section(rules: Mapping[str, Any] | str | None) -> list[str]:
    lines = ["## Competition rules", ""]
    if rules is None:
        return lines + ["Not checked here: `mergelab check RECIPE` checks the inputs against the LLM Merging "
                        "Competition's rules.", ""]
    if isinstance(rules, str):
        return lines + [f"Not checked ({rules}).", ""]
    verdict = "**passed**" if rules.get("ok") else "**not passed**"
    lines += [f"The rule check {verdict} (cut-off {rules.get('cutoff')}, at most {rules.get('max_params')} "
              "parameters).", "", "| model | role | rule | status | reason |", "|---|---|---|---|---|"]
    for f in rules.get("findings", []):
        lines.append("| " + " | ".join(_cell(f.get(k, "")) for k in ("model", "role", "rule", "status", "reason"))
                     + " |")
    return lines + [""]


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _scores_section(scores: Mapping[str, Any]) -> list[str]:
    rows = [("overall", scores.get("overall") or {})] + sorted((scores.get("files") or {}).items())
    keys = sorted({k for _, r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    lines = ["## Scores", "", "From `mergelab run`'s evaluation (`eval/scores.json`)"
             + ("" if scores.get("complete", True) else "; **incomplete**: the deadline stopped it") + ".", "",
             "| data | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows:
        lines.append(f"| {_cell(name)} | " + " | ".join(_number(r[k]) if k in r else "" for k in keys) + " |")
    return lines + [""]


def render_card(inputs: Sequence[CardInput], recipe: Mapping[str, Any], *, method: str, output_format: str,
                rules: Mapping[str, Any] | str | None = None, scores: Mapping[str, Any] | None = None
                ) -> tuple[str, list[str]]:
    """``(README.md text, licence warnings)`` for a merge of ``inputs`` by ``recipe`` (a JSON-able dict).

    ``rules``: the rule check's ``Report.to_dict()``, a reason it was not run, or None (not known);
    ``scores``: ``eval/scores.json`` of a run. Same arguments, same bytes.
    """
    licence, warnings = derive_licence(inputs)
    what = "LoRA adapter (PEFT)" if output_format == "lora" else "model"
    lines = ["---", _front_matter(inputs, method, output_format, licence).rstrip("\n"), "---", "",
             f"# A {method} merge made with mergelab", "",
             f"This {what} is a merge of the models below, made with mergelab using **{method}**."
             + (" Load it with PEFT on top of its base." if output_format == "lora" else ""), ""]
    for w in warnings:
        lines += [f"> **Licence warning:** {w}", ""]
    lines += ["## Inputs", "", "| role | model | revision | licence |", "|---|---|---|---|"]
    for i in inputs:
        model = f"[{i.repo}]({HUB_URL}/{i.repo})" if i.repo else f"local folder `{_cell(i.path)}`"
        rev = f"`{i.revision}`" if i.revision else "–"
        lic = f"{i.license} (from {i.license_from})" if i.license else "unknown"
        lines.append(f"| {i.role} | {model} | {rev} | {_cell(lic)} |")
    lines += ["", f"Licence of this merge: `{licence}`"
              + {"unknown": " (no input states a licence: check each input's terms).",
                 "other": " (the inputs' licences differ; see the warning above)."}.get(licence, "."), ""]
    lines += _method_section(method)
    lines += ["## Recipe", "", "```yaml",
              yaml.safe_dump(dict(recipe), sort_keys=True, allow_unicode=True, default_flow_style=False).rstrip("\n"),
              "```", ""]
    lines += _rules_section(rules)
    if scores:
        lines += _scores_section(scores)
    return "\n".join(lines).rstrip("\n") + "\n", warnings


def write_card(folder: str | Path, text: str) -> Path:
    """Write ``text`` as ``folder/README.md`` (UTF-8, ``\\n`` line ends)."""
    path = Path(folder) / CARD_NAME
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return path


def pinned_recipe(recipe, inputs: Sequence[CardInput]) -> dict:
    """The recipe as a dict, each Hub input's revision replaced by its pinned commit."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    for entry, i in zip([data.get("base", {}), *data.get("experts", [])], inputs):
        if entry.get("model") and i.revision:
            entry["revision"] = i.revision
    if data.get("slices"):   # a layer stack: each slice of a Hub model names the commit its model resolved to
        if not data.get("experts"):
            data.pop("experts", None)
        pinned = {(ref.model, ref.revision): i.revision for (_, ref), i in zip(_input_models(recipe), inputs[1:])}
        for entry, ref in zip(data["slices"], recipe.slices):
            if ref.model and pinned.get((ref.model, ref.revision)):
                entry["revision"] = pinned[(ref.model, ref.revision)]
    return data


def write_merge_card(folder: str | Path, recipe, base_path: str | Path, expert_paths: Sequence[str | Path],
                     warn: Callable[[str], None] | None = None) -> list[str]:
    """Write the card of a finished merge into ``folder`` (the merge's temporary output folder).

    The licence of a Hub input (``model:`` in the recipe, or a Hub-cache snapshot) is asked of the
    Hub when its folder has no README licence. Returns the licence warnings (also sent to ``warn``).
    """
    asks_hub = any(getattr(r, "model", None) for r in [recipe.base, *recipe.experts, *(recipe.slices or [])])
    inputs = card_inputs(recipe, base_path, expert_paths, licence=hub_licence() if asks_hub else None)
    text, warnings = render_card(inputs, pinned_recipe(recipe, inputs), method=recipe.method.name,
                                 output_format=recipe.output.format)
    write_card(folder, text)
    for w in warnings:
        if warn is not None:
            warn(w)
    return warnings
