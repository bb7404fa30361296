"""Benchmark: merges at the real shapes of Llama-3-8B, Mistral-7B and Gemma-7B, mergelab against mergekit.

    python bench/real_scale.py                                  # Llama-3-8B shapes, TIES, base + 3 experts
    python bench/real_scale.py --arch gemma-7b --experts 7      # Gemma-7B's 256000 × 3072 embedding, 7 experts
    python bench/real_scale.py --methods ties,dare_ties,slerp,model_stock --arch mistral-7b
    python bench/real_scale.py --skip-mergekit                  # mergelab alone (quick)

Inputs (synthetic, bfloat16, built once into ``--workdir/ARCH`` and reused): a base and up to
``--experts`` experts with the architecture's real tensor shapes — the full embedding (and the
untied head), and ``--layers`` decoder layers of the real width (default 4, so that Llama-3-8B's
base + 3 experts take ~15 GB of disk); each expert is the base plus dense noise. Building them
writes row blocks through mergelab's own writer, so the builder never holds a whole tensor.

Measured, each tool in its own child process (this driver never imports torch): wall time, CPU
time and peak RSS (the child's ``ru_maxrss`` from ``wait4``, cross-checked by polling its process
tree), for ``mergelab merge CONFIG`` and ``mergekit-yaml CONFIG`` (0.1.5, default options) on one
mergekit YAML file. mergekit is stopped if it grows past ``--rss-cap-gb`` (default 20 GiB, so that
it cannot take the whole 24 GiB machine down); the table then says so. The page cache is warmed
with one read of the inputs first; when the inputs exceed the RAM, both tools read from disk.

Goals (issue 20): mergelab's peak RSS ≤ 1.5 GiB and ≤ 0.25 × mergekit's, whatever the number of
experts and the vocabulary; ≥ 2 × faster. The machine's load average is printed with each run.

Measured 2026-12-03 on the 2-core CPU (24 GiB), load average 3.4–5.5 from other work throughout,
4 real layers, bf16; wall time / peak RSS, mergelab against mergekit 0.1.5:

    Llama-3-8B  TIES       base + 3   179.5 s / 0.68 GiB   817.6 s / 20.66 GiB   4.56x faster, 0.033x the memory
    Llama-3-8B  TIES       base + 7   586.8 s / 1.23 GiB   (not run: 30.8 GB of inputs, more than the RAM)
    Gemma-7B    TIES       base + 3   135.8 s / 0.61 GiB   stopped at the 22 GiB cap after 160 s
    Mistral-7B  TIES       base + 3   145.2 s / 0.48 GiB   614.9 s / 12.31 GiB   4.23x, 0.039x
    Mistral-7B  DARE-TIES  base + 3   214.5 s / 0.54 GiB   368.7 s / 11.85 GiB   1.72x, 0.045x (CPU 108 vs 192 s)
    Mistral-7B  SLERP      base + 1    21.2 s / 0.63 GiB   110.1 s /  6.77 GiB   5.19x, 0.093x
    Mistral-7B  model stock base + 3   68.1 s / 0.63 GiB    78.7 s / 11.32 GiB   1.16x, 0.056x

Outputs (--compare): TIES 98.58 % of entries within bf16 rounding of mergekit's (relative L2 1.0e-2;
mergelab computes in float32 with deterministic ties, mergekit in bf16), SLERP and model stock 100 %.
DARE-TIES and model stock read their inputs twice (statistics, then the merge) and DARE draws its
random numbers three times per entry (~12 ns each here): they are below the 2x goal.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _measure import compare_checkpoints, gib, load_average, measure_command, read_once

HERE = Path(__file__).resolve()

ARCHS = {
    # vocabulary, hidden, MLP, heads, KV heads, head dim, tied embeddings, model type
    "llama3-8b": dict(vocab=128256, hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, tied=False,
                      model_type="llama", arch="LlamaForCausalLM"),
    "mistral-7b": dict(vocab=32000, hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, tied=False,
                       model_type="mistral", arch="MistralForCausalLM"),
    "gemma-7b": dict(vocab=256000, hidden=3072, inter=24576, heads=16, kv=16, head_dim=256, tied=True,
                     model_type="gemma", arch="GemmaForCausalLM"),
}
BUILD_BLOCK = 1 << 25   # elements generated at once while building the inputs


def shapes_of(a: dict, layers: int) -> dict[str, tuple[int, ...]]:
    h, q, kv = a["hidden"], a["heads"] * a["head_dim"], a["kv"] * a["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a["vocab"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (a["inter"], h), p + "mlp.up_proj.weight": (a["inter"], h),
            p + "mlp.down_proj.weight": (h, a["inter"]),
        })
    shapes["model.norm.weight"] = (h,)
    if not a["tied"]:
        shapes["lm_head.weight"] = (a["vocab"], h)
    return shapes


# ------------------------------------------------------------------------------ child: build inputs


def _build(workdir: Path, arch: str, layers: int, experts: int) -> None:
    import torch

    from mergelab.io.checkpoint import ShardedWriter

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    a = ARCHS[arch]
    shapes = shapes_of(a, layers)
    layout = [(k, s, torch.bfloat16) for k, s in shapes.items()]
    names = ["base"] + [f"expert{i}" for i in range(experts)]
    writers = []
    for name in names:
        (workdir / name).mkdir(parents=True, exist_ok=True)
        writers.append(ShardedWriter(workdir / name, "5GB", layout=layout))
    for k, (tname, shape) in enumerate(shapes.items()):
        cols = math.prod(shape[1:])
        step = max(1, BUILD_BLOCK // max(cols, 1))
        for b, r0 in enumerate(range(0, shape[0], step)):
            rows = (min(shape[0], r0 + step) - r0, *shape[1:])
            g = torch.Generator().manual_seed(k * 100_003 + b)
            base = torch.randn(rows, generator=g) * (1.0 if len(shape) == 1 else 0.02)
            writers[0].add_rows(tname, r0, base.bfloat16())
            for m in range(1, len(names)):
                g.manual_seed(1_000_003 * m + k * 100_003 + b)
                writers[m].add_rows(tname, r0, (base + torch.randn(rows, generator=g) * 0.002).bfloat16())
    for w in writers:
        w.close()
    config = {"architectures": [a["arch"]], "model_type": a["model_type"], "hidden_size": a["hidden"],
              "intermediate_size": a["inter"], "num_hidden_layers": layers, "num_attention_heads": a["heads"],
              "num_key_value_heads": a["kv"], "head_dim": a["head_dim"], "vocab_size": a["vocab"],
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": a["tied"],
              "hidden_act": "gelu_pytorch_tanh" if a["model_type"] == "gemma" else "silu",
              "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    for name in names:
        (workdir / name / "config.json").write_text(json.dumps(config, indent=2))
    n = sum(math.prod(s) for s in shapes.values())
    (workdir / "params.json").write_text(json.dumps({"arch": arch, "layers": layers, "experts": experts, "params": n}))


def _read_once(paths: list[str]) -> None:
    print(read_once(f for folder in paths for f in sorted(Path(folder).glob("*.safetensors"))))


def _compare(a: Path, b: Path) -> None:
    print(json.dumps(compare_checkpoints(a, b)))


# ---------------------------------------------------------------------------------- driver


def _config(wd: Path, method: str, experts: int, density: float) -> dict:
    models = [f"expert{i}" for i in range(experts)]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(wd / "base"),
                "models": [{"model": str(wd / "base")}, {"model": str(wd / "expert0")}],
                "parameters": {"t": 0.4}, "dtype": "bfloat16"}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": str(wd / "base"),
                "models": [{"model": str(wd / m)} for m in models], "dtype": "bfloat16"}
    return {"merge_method": method, "base_model": str(wd / "base"),
            "models": [{"model": str(wd / m), "parameters": {"weight": 1.0, "density": density}} for m in models],
            "parameters": {"normalize": True}, "dtype": "bfloat16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama3-8b", help=f"comma-separated: {', '.join(ARCHS)}")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the real shape (default 4)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", default="ties", help="comma-separated: ties, dare_ties, slerp, model_stock")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergelab-real-scale")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--device", default="cpu", help="mergelab's device (cpu, cuda); mergekit runs on the CPU")
    ap.add_argument("--compare", action="store_true", help="compare the two tools' outputs (TIES, SLERP, model stock)")
    ap.add_argument("--rss-cap-gb", type=float, default=20.0, help="stop mergekit past this peak RSS")
    ap.add_argument("--cleanup", action="store_true", help="delete the inputs afterwards")
    ap.add_argument("--json", type=Path, help="append the figures here, after every run")
    args = ap.parse_args()

    cpus = len(os.sched_getaffinity(0))
    rows = []
    for arch in args.arch.split(","):
        wd = args.workdir / arch
        meta = wd / "params.json"
        want = {"arch": arch, "layers": args.layers}
        old = json.loads(meta.read_text()) if meta.is_file() else {}
        if {k: old.get(k) for k in want} != want or old.get("experts", 0) < args.experts:
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir(parents=True)
            print(f"building {arch} inputs ({args.layers} layers, base + {args.experts} experts) in {wd} ...", flush=True)
            t = time.perf_counter()
            subprocess.run([sys.executable, str(HERE), "_build", str(wd), arch, str(args.layers), str(args.experts)],
                           check=True)
            print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
        params = json.loads(meta.read_text())["params"]
        for method in args.methods.split(","):
            n_exp = 1 if method == "slerp" else args.experts
            folders = [str(wd / "base")] + [str(wd / f"expert{i}") for i in range(n_exp)]
            input_bytes = sum(f.stat().st_size for d in folders for f in Path(d).glob("*.safetensors"))
            cfg_file = wd / f"{method}-{n_exp}.yml"
            import yaml  # noqa: PLC0415 - the driver stays light

            cfg_file.write_text(yaml.safe_dump(_config(wd, method, n_exp, args.density)))
            print(f"\n{arch}: {method}, base + {n_exp} expert(s), {params / 1e9:.2f}B parameters each "
                  f"({args.layers} layers), {input_bytes / 1e9:.1f} GB of bf16 inputs; {cpus} CPUs", flush=True)
            measure_command([sys.executable, str(HERE), "_read", *folders])  # warm the page cache
            res = {}
            out_ml, out_mk = wd / "out-mergelab", wd / "out-mergekit"
            for tool, cmd, out in (
                ("mergelab", [sys.executable, "-m", "mergelab", "merge", str(cfg_file), "--out", str(out_ml),
                              "--force", "--quiet", "--device", args.device], out_ml),
                ("mergekit", [sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg_file), str(out_mk),
                              "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], out_mk),
            ):
                if tool == "mergekit" and args.skip_mergekit:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                load = load_average()[0]
                print(f"  running {tool} (load average {load:.1f}) ...", flush=True)
                r = measure_command(cmd, rss_cap=int(args.rss_cap_gb * 2**30) if tool == "mergekit" else None,
                                    check=tool == "mergelab")
                r.pop("stdout", None)
                r["load"] = load
                res[tool] = r
                status = "stopped at the RSS cap" if r.get("capped") else (
                    f"failed ({r['returncode']})" if r["returncode"] else "ok")
                print(f"  {tool:<9} {r['wall_s']:>7.1f} s wall {r['cpu_s']:>7.1f} s CPU  peak RSS "
                      f"{gib(r['peak_rss']):>10}  {status}", flush=True)
            row = {"arch": arch, "method": method, "experts": n_exp, "layers": args.layers, "params": params,
                   "input_bytes": input_bytes, **{k: v for k, v in res.items()}}
            ml, mk = res["mergelab"], res.get("mergekit")
            if mk and not mk.get("returncode"):
                row["speedup"] = mk["wall_s"] / ml["wall_s"]
                row["rss_ratio"] = ml["peak_rss"] / mk["peak_rss"]
                print(f"  → {row['speedup']:.2f}x faster than mergekit, {row['rss_ratio']:.3f}x its peak RSS "
                      f"(goals: >= 2x, <= 0.25x; mergelab <= 1.5 GiB: {ml['peak_rss'] <= 1.5 * 2**30})")
                if args.compare and method != "dare_ties":
                    agree = json.loads(measure_command([sys.executable, str(HERE), "_compare", str(out_ml),
                                                        str(out_mk)])["stdout"])
                    row["agreement"] = agree
                    print(f"  outputs: {100 * agree['close']:.2f}% of entries within bf16 rounding of "
                          f"mergekit's; relative L2 difference {agree['rel_l2']:.2e}")
            elif mk:
                print(f"  → mergekit did not finish ({'memory cap' if mk.get('capped') else mk.get('error', '')[-300:]}); "
                      f"mergelab peak RSS {gib(ml['peak_rss'])} (goal <= 1.5 GiB)")
            rows.append(row)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
            for out in (out_ml, out_mk):
                shutil.rmtree(out, ignore_errors=True)
        if args.cleanup:
            shutil.rmtree(wd, ignore_errors=True)
    print(f"\nrerun: python {os.path.relpath(HERE)} --arch {args.arch} --layers {args.layers} "
          f"--experts {args.experts} --methods {args.methods}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        _build(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_read":
        _read_once(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_compare":
        _compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
