"""Benchmark: TIES merge of a synthetic Llama-shaped model, mergelab against mergekit.

    python bench/merge_speed.py                 # ~254M parameters, bf16, base + 3 experts
    python bench/merge_speed.py --layers 4      # a quick run (~110M parameters)

Inputs: a base and three experts with the shapes of a small Llama (hidden 1024, MLP 2816, 16
layers, GQA 16/8 heads, vocabulary 32000, untied head), stored as bfloat16 safetensors; each
expert is the base plus dense noise. They are built once into ``--workdir`` and reused.

Measured, each tool in its own child process (this driver never imports torch): wall time, and
peak RSS (the child's ``ru_maxrss`` from ``wait4``, cross-checked by polling psutil), for

* ``read once``  — reading every input byte once into a reused buffer (the floor for any tool);
* ``mergelab``   — ``mergelab merge CONFIG --out DIR`` on a mergekit YAML config;
* ``mergekit``   — ``mergekit-yaml CONFIG DIR`` (0.1.5, default options) on the same file.

Each run writes its figures to ``--json`` as soon as it ends, so an interrupted run keeps them.

The page cache is warm for every run (the inputs fit in RAM; a warm-up read comes first), so the
figures compare computation and memory, not the disk. The outputs of the two tools are compared
too: mergekit computes in the config's dtype (bfloat16) and breaks magnitude ties arbitrarily,
mergelab computes in float32 with deterministic ties, so they agree closely but not bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _measure import compare_checkpoints, gib, load_average, measure_command, read_once

HERE = Path(__file__).resolve()
VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 32000, 1024, 2816, 16, 8


# ------------------------------------------------------------------------------ child: build inputs


def _build(workdir: Path, layers: int) -> None:
    import torch

    from mergelab.io.checkpoint import ShardedWriter

    head_dim = HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": head_dim, "vocab_size": VOCAB,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    names = ["base", "expert0", "expert1", "expert2"]
    for m, name in enumerate(names):
        out = workdir / name
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardedWriter(out, "2GB")
        for k, (tname, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(k)  # the same base in every model
            base = torch.randn(shape, generator=g) * (1.0 if len(shape) == 1 else 0.02)
            if m:
                g2 = torch.Generator().manual_seed(1000 * m + k)
                base += torch.randn(shape, generator=g2) * 0.002
            writer.add(tname, base.bfloat16())
        writer.close()
        (out / "config.json").write_text(json.dumps(config, indent=2))
    n = sum(int(__import__("math").prod(s)) for s in shapes.values())
    (workdir / "params.json").write_text(json.dumps({"layers": layers, "params": n}))


def _read_once(workdir: Path) -> None:
    print(read_once(sorted(workdir.glob("base/*.safetensors")) + sorted(workdir.glob("expert*/*.safetensors"))))


def _compare(a: Path, b: Path) -> None:
    print(json.dumps(compare_checkpoints(a, b)))


# ---------------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergelab-bench")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16 → ~254M parameters)")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--skip-mergekit", action="store_true", help="measure mergelab and the read only")
    ap.add_argument("--cleanup", action="store_true", help="delete the inputs afterwards")
    ap.add_argument("--json", type=Path, help="also write the figures here, after every run")
    args = ap.parse_args()

    wd = args.workdir
    meta = wd / "params.json"
    if not meta.is_file() or json.loads(meta.read_text())["layers"] != args.layers:
        shutil.rmtree(wd, ignore_errors=True)
        print(f"building inputs in {wd} ...", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(HERE), "_build", str(wd), str(args.layers)], check=True)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    params = json.loads(meta.read_text())["params"]
    config = {
        "merge_method": "ties", "base_model": str(wd / "base"),
        "models": [{"model": str(wd / f"expert{i}"), "parameters": {"weight": w, "density": args.density}}
                   for i, w in enumerate((1.0, 0.7, 0.5))],
        "parameters": {"normalize": True}, "dtype": "bfloat16",
    }
    cfg_file = wd / "ties.yml"
    import yaml  # noqa: PLC0415 - the driver stays light

    cfg_file.write_text(yaml.safe_dump(config))
    input_bytes = sum(f.stat().st_size for f in wd.glob("*/*.safetensors") if f.parent.name in
                      ("base", "expert0", "expert1", "expert2"))
    cpus = len(os.sched_getaffinity(0))
    print(f"inputs: base + 3 experts, {params / 1e6:.0f}M parameters each, bfloat16, "
          f"{input_bytes / 1e9:.2f} GB in total; TIES density {args.density}; "
          f"{cpus} CPUs", flush=True)

    results = {}

    def save(**extra) -> None:  # after every run, so that an interrupted run keeps its figures
        if args.json:
            runs = {k: {kk: vv for kk, vv in v.items() if kk != "stdout"} for k, v in results.items()}
            args.json.write_text(json.dumps({"params": params, "input_bytes": input_bytes, "cpus": cpus,
                                             **runs, **extra}, indent=2))

    measure_command([sys.executable, str(HERE), "_read", str(wd)])  # warm the page cache
    results["read once"] = measure_command([sys.executable, str(HERE), "_read", str(wd)])
    out_ml, out_mk = wd / "out-mergelab", wd / "out-mergekit"
    for tool, cmd, out in (
        ("mergelab", [sys.executable, "-m", "mergelab", "merge", str(cfg_file), "--out", str(out_ml),
                      "--force", "--quiet", "--device", "cpu"], out_ml),
        ("mergekit", [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_file), str(out_mk),
                      "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], out_mk),
    ):
        if tool == "mergekit" and args.skip_mergekit:
            continue
        shutil.rmtree(out, ignore_errors=True)
        load = load_average()[0]
        print(f"running {tool} (load average {load:.1f}) ...", flush=True)
        results[tool] = measure_command(cmd)
        results[tool]["load"] = load
        save()

    print()
    print(f"{'':<10} {'wall':>9} {'CPU (user+sys)':>15} {'peak RSS':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['wall_s']:>8.1f}s {r['cpu_s']:>14.1f}s {gib(r['peak_rss']):>11}")
    ml = results["mergelab"]
    print()
    print(f"mergelab / read once: {ml['wall_s'] / results['read once']['wall_s']:.1f}x the time of reading the inputs")
    if "mergekit" in results:
        mk = results["mergekit"]
        print(f"speed-up vs mergekit: {mk['wall_s'] / ml['wall_s']:.1f}x wall, "
              f"{mk['cpu_s'] / ml['cpu_s']:.1f}x CPU time  (goal >= 2x)")
        print(f"peak RSS vs mergekit: {ml['peak_rss'] / mk['peak_rss']:.2f}x  (goal <= 0.5x)")
        agree = json.loads(measure_command([sys.executable, str(HERE), "_compare", str(out_ml), str(out_mk)])["stdout"])
        print(f"outputs: {100 * agree['close']:.2f}% of entries within bf16 rounding of mergekit's; "
              f"relative L2 difference {agree['rel_l2']:.2e}")
        save(agreement=agree)
    print(f"\nrerun: python {os.path.relpath(HERE)} --layers {args.layers}")
    if args.cleanup:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        _build(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_read":
        _read_once(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_compare":
        _compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
