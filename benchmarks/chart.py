"""Render a pytest-benchmark JSON of the hot-path benchmarks: a markdown table, the targets, and a PNG.

    python -m benchmarks.chart results.json [more.json ...] --png benchmarks/chart.png [--markdown out.md]

The PNG has one panel per operation x model: GFLOP/s per implementation and shape, fp32 hatched beside
bf16 solid, with the roofline (the block's FLOPs over the larger of the two roof times) drawn as a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import report

SHAPE_ORDER = ("prefill-17", "prefill-128", "prefill-512", "decode-512")
COLOURS = {"impl-fused": "#08306b", "impl-generate": "#2171b5", "impl": "#6baed6", "user": "#31a354",
           "walkthrough": "#7f7f7f", "hf": "#ff7f0e", "hf-eager": "#ff7f0e", "hf-sdpa": "#d62728"}


def _load(paths: list[Path]) -> dict:
    """One run, or several merged: per benchmark, the run with the fastest round (on a shared machine another
    process only ever adds time, so the fastest of several runs is the best estimate of each block's cost)."""
    runs = [json.loads(p.read_text()) for p in paths]
    data = runs[0]
    best = {b["fullname"]: b for b in data["benchmarks"]}
    for run in runs[1:]:
        for b in run["benchmarks"]:
            if b["fullname"] not in best or b["stats"][report.STAT] < best[b["fullname"]]["stats"][report.STAT]:
                best[b["fullname"]] = b
    data["benchmarks"] = list(best.values())
    shares = [r["machine_info"].get("torch", {}).get("other_processes_cpu_share") for r in runs]
    known = [share for share in shares if share is not None]
    data["machine_info"].setdefault("torch", {})["other_processes_cpu_share"] = min(known) if known else None
    data["runs"] = len(runs)
    report.annotate(data["benchmarks"], data["machine_info"])  # again: the ratios of the merged times
    return data


def _machine(data: dict) -> str:
    t = data["machine_info"].get("torch", {})
    load = t.get("load_average")
    return (f"{t.get('cpu_model', '?')}, {t.get('cores', '?')} cores ({t.get('cpu_capability', '?')}, "
            f"AVX512-BF16 {'yes' if t.get('avx512_bf16') else 'no'}, AMX {'yes' if t.get('amx_bf16') else 'no'}), "
            f"torch {t.get('version', '?')}, {t.get('threads', '?')} threads; other processes took "
            + ("an unknown share" if (share := t.get("other_processes_cpu_share")) is None else f"{100 * share:.0f}%")
            + " of the CPU during the (quietest) run"
            + (f", load average {load[0]:.1f} at its end" if load else ""))


def roofs_markdown(info: dict) -> list[str]:
    """The roofs table: the engine that set each, every engine's rate, the theoretical peak, the CPU's flags."""
    roofs = info.get("roofs")
    if not roofs:
        return ["No roofs in this JSON (a run from before issue 14)."]
    lines = [f"CPU: {roofs['cpu_model']}, {roofs['threads']} threads. Flags: `{roofs['cpu_flags']}`", "",
             "| roof | measured | set by | every engine | theoretical |", "|---|---|---|---|---|"]
    theo = roofs.get("theoretical") or {}
    for dtype in ("fp32", "bf16"):
        r = roofs[dtype]
        rows, k, n = r.get("shape") or roofs["shape"]  # the shape that set it (one top-level shape before 2026-11-26)
        every = ", ".join(f"{name} {v:.0f}" for name, v in sorted(r["engines"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {dtype} GEMM ({rows}x{k} @ {k}x{n}) | {r['gflops']:.1f} GFLOP/s | {r['engine']} | {every} | "
                     + (f"{theo[dtype]:.0f} GFLOP/s" if dtype in theo else "not readable") + " |")
    bw = roofs["bandwidth"]
    lines.append(f"| read bandwidth ({bw['buffer_bytes'] / 1e6:.0f} MB, 4x the {bw['last_level_cache_bytes'] / 1e6:.0f}"
                 f" MB last-level cache) | {bw['gbytes_per_s']:.1f} GB/s | {bw['how']} | | |")
    if theo:
        lines += ["", f"Theoretical: {theo['how']}."]
        beaten = [d for d in ("fp32", "bf16") if d in theo and roofs[d]["gflops"] > theo[d]]
        if beaten:  # the clock /proc/cpuinfo reports is not the one the cores run at (a VM shows its base clock)
            lines.append("The measured " + " and ".join(beaten) + " peak beats this: the cores run faster than the "
                         "reported clock (a virtual machine reports its base clock, not its boost), by at least "
                         + f"{max(roofs[d]['gflops'] / theo[d] for d in beaten):.2f}x. "
                         "The measured peaks are the roofs.")
    return lines


MAX_OTHER_SHARE = 0.05  # other processes' share of the CPU above which a run's timings are not trusted


def trust_line(info: dict) -> str | None:
    """A warning when other processes shared the machine (or nobody knows): the timings are then stalls."""
    share = info.get("torch", {}).get("other_processes_cpu_share")
    if share is not None and share <= MAX_OTHER_SHARE:
        return None
    took = "an unknown share" if share is None else f"{100 * share:.0f}%"
    return (f"**NOT A TRUSTWORTHY RUN: other processes took {took} of the CPU** (at most "
            f"{100 * MAX_OTHER_SHARE:.0f}% for a run whose times, ratios and targets count).")


def engines_markdown(info: dict) -> list[str]:
    """The run's GEMM engine table (impl.engines): GFLOP/s per engine and row class, and impl's choice."""
    from impl import engines

    timings = info.get("engines")
    if not timings:
        return ["No engine table in this JSON (a run from before issue 14)."]
    elements = report.engine_elements(info)
    names = [e for e in engines.ENGINES if any(e in timings[d][c] for d in timings for c in timings[d])]
    lines = [f"GEMM engines (`python -m impl engines`), GFLOP/s of x @ w.T over its weights ({elements / 1e6:.1f} M "
             "elements), each product between torch's parallel ops; '-' = unavailable or wrong here; the last "
             "column: the fastest impl may hold (no second copy; plain or packed weights):", "",
             "| dtype | rows | " + " | ".join(names) + " | fastest, no second copy |", "|" + "---|" * (3 + len(names))]
    for dtype in timings:
        for rclass, row in timings[dtype].items():
            rows = engines.ROWS.get(rclass, 0)
            cells = [f"{2 * rows * elements / row[e] / 1e9:.1f}" if row.get(e) else "-" for e in names]
            best = report.best_engine(info, dtype, rclass)
            lines.append(f"| {dtype} | {rclass} ({rows}) | " + " | ".join(cells) + f" | {best[0] if best else '-'} |")
    return lines


def cores_markdown(info: dict) -> list[str]:
    """The run's attention cores (impl.engines.measure_cores): ms per core and row class on each measured head
    shape, and impl's choice there. A run of before (METHOD < 8) holds one table over both head shapes added."""
    from impl import engines

    cores = info.get("attention_cores")
    if not cores:
        return []
    if set(cores) & set(engines.DTYPES):  # the table of before: every head shape added
        cores = {" + ".join(engines.heads_key(s) for s in engines.CORE_SHAPES): cores}
    lines = ["Attention cores (`python -m impl engines`), ms on heads x kv heads x head dim "
             f"(decode: one query after {engines.CORE_DECODE_KEYS} keys); '-' = wrong here:", "",
             "| heads | dtype | rows | " + " | ".join(engines.CORES) + " | chosen |",
             "|" + "---|" * (4 + len(engines.CORES))]
    for heads, timings in cores.items():
        for dtype, classes in timings.items():
            for rclass, row in classes.items():
                cells = [f"{1e3 * row[c]:.3f}" if row.get(c) else "-" for c in engines.CORES]
                lines.append(f"| {heads} | {dtype} | {rclass} ({engines.CORE_ROWS.get(rclass, 0)}) | "
                             + " | ".join(cells) + f" | {engines.choose_core(timings, dtype, rclass)} |")
    return lines + [""]


def targets_markdown(benchmarks: list[dict], info: dict) -> list[str]:
    """Every issue-14 target as a ratio of this run's numbers: met or missed, and for a missed one whether this
    run's engine table shows it beyond the best engine impl may hold."""
    found = report.targets(benchmarks, info)
    lines = ["Goals set by this machine's measurements:"] + [f"- {g}" for g in report.goals(info)] + [
        "", "| target | where | measured | goal | | beyond the machine's best engine? |", "|---|---|---|---|---|---|"]
    for t in found:
        lines.append(f"| {t.what} | {t.where} | {t.value:.2f} | {t.goal:.2f} | {'met' if t.met else 'MISSED'} "
                     f"| {t.beyond} |")
    lines.append(f"\n{sum(t.met for t in found)} of {len(found)} target checks met (a ratio >= {report.TIE} of its "
                 "goal counts as a tie for the vs-transformers goals).")
    missing = report.unmeasured(found)
    if missing:
        lines.append("Not in this run (no row above): " + "; ".join(missing) + ".")
    return lines


def markdown(data: dict) -> str:
    benchmarks = data["benchmarks"]
    info = data["machine_info"]
    lines = [f"Machine: {_machine(data)}. Run {data.get('datetime', '')[:16]}, {len(benchmarks)} benchmarks. "
             "Times: the fastest round" + (f" of {data['runs']} runs." if data.get("runs", 1) > 1 else "."), ""]
    if (warning := trust_line(info)) is not None:
        lines += [warning, ""]
    lines += roofs_markdown(info) + [""] + engines_markdown(info) + [""] + cores_markdown(info)
    names = [n for n in COLOURS if any(b["extra_info"]["implementation"] == n for b in benchmarks)]
    lines += ["| block | model | shape | dtype | " + " | ".join(names) + " | roof (bound) | "
              "hot % of roof | hot vs best hf | hot bf16/fp32 |",
              "|" + "---|" * (8 + len(names)), ]
    groups = report.by_group(benchmarks)
    nan = float("nan")
    for group in sorted(groups, key=_group_order):
        rows = {(b["extra_info"]["implementation"], b["extra_info"]["dtype"]): b["extra_info"] for b in groups[group]}
        for dtype in ("fp32", "bf16"):
            hot = rows.get((report.HOT.get(group.split()[0]), dtype))
            if hot is None:
                continue
            unit = "tokens_per_s" if hot["op"] == "generate" else "gflops"
            cells = [f"{rows[n, dtype][unit]:.1f}" if (n, dtype) in rows else "" for n in names]
            roof = hot["gflops"] / hot["roofline_fraction"] if "roofline_fraction" in hot else nan
            frac = f"{100 * hot['roofline_fraction']:.0f}%" if "roofline_fraction" in hot else ""
            lines.append(f"| {hot['op']} | {hot['model']} | {hot['shape']} | {dtype} | " + " | ".join(cells)
                         + f" | {roof:.1f} ({hot.get('bound', '-')}) | {frac}"
                         + f" | {hot.get('vs_best_hf', nan):.2f}x | {hot.get('bf16_speedup', nan):.2f}x |")
    lines += ["", "GFLOP/s per implementation (useful FLOPs: causal pairs only), tokens/s for `generate`. Hot: "
              "impl-generate for blocks and layers (the weights `impl generate` holds), impl for whole models "
              "(forward_fast on them). Roof: the block's FLOPs at the machine's "
              "best GEMM rate, or its bytes at the read rate, whichever takes longer.", ""]
    lines += diagnosis_markdown(benchmarks)
    lines += targets_markdown(benchmarks, info)
    violations = report.roof_violations(benchmarks)
    if violations:
        lines += ["", "ROOF EXCEEDED (the roof measurement is wrong; this run fails):"] + [f"- {v}" for v in violations]
    return "\n".join(lines) + "\n"


def diagnosis_markdown(benchmarks: list[dict]) -> list[str]:
    """The diagnosis timings (benchmarks/test_diagnosis.py): seconds per diagnosed failure, not a kernel."""
    rows = sorted((b for b in benchmarks if b["extra_info"].get("op") == "diagnosis"),
                  key=lambda b: (b["extra_info"]["bug"], b["extra_info"]["dtype"]))
    if not rows:
        return []
    lines = ["Diagnosis of the first failing stage (`golden.diagnose.diagnose`, SmolLM2-135M), seconds:", "",
             "| bug | dtype | stage | seconds |", "|---|---|---|---|"]
    lines += [f"| {b['extra_info']['bug']} | {b['extra_info']['dtype']} | `{b['extra_info']['stage']}` | "
              f"{b['stats'][report.STAT]:.2f} |" for b in rows]
    return lines + [""]


def _group_order(group: str) -> tuple:
    op, model, shape = (group.split() + ["", ""])[:3]
    ops = ("attention", "ffn", "layer", "forward", "generate")
    return (ops.index(op) if op in ops else 9, model, SHAPE_ORDER.index(shape) if shape in SHAPE_ORDER else 99)


def chart(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # kernels only: generate (tokens/s) and diagnosis (seconds) are in the table
    benchmarks = [b for b in data["benchmarks"] if "gflops" in b["extra_info"] and b["extra_info"]["op"] != "generate"]
    panels = sorted({(b["extra_info"]["op"], b["extra_info"]["model"]) for b in benchmarks})
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (op, model_name) in zip(axes[:, 0], panels, strict=True):
        rows = [b["extra_info"] for b in benchmarks
                if (b["extra_info"]["op"], b["extra_info"]["model"]) == (op, model_name)]
        names = [n for n in COLOURS if any(r["implementation"] == n for r in rows)]
        shapes = [s for s in SHAPE_ORDER if any(r["shape"] == s for r in rows)]
        names = [n for n in names if any(r["implementation"] == n and "gflops" in r for r in rows)]
        width = 0.8 / (2 * len(names))
        for si, shape in enumerate(shapes):
            for di, dtype in enumerate(("fp32", "bf16")):
                for ni, name in enumerate(names):
                    r = next((r for r in rows if (r["shape"], r["dtype"], r["implementation"]) == (shape, dtype, name)),
                             None)
                    if r is None:
                        continue
                    x = si + (di * len(names) + ni) * width - 0.4 + width / 2
                    ax.bar(x, r["gflops"], width, color=COLOURS[name], hatch="//" if dtype == "fp32" else None,
                           alpha=0.55 if dtype == "fp32" else 1.0, edgecolor="white", linewidth=0.3,
                           label=f"{name} {dtype}" if si == 0 else None)
                hot = report.HOT.get(op)
                impl = next((r for r in rows if (r["shape"], r["dtype"], r["implementation"]) == (shape, dtype, hot)),
                            None)
                if impl and "roofline_fraction" in impl:
                    roof = impl["gflops"] / impl["roofline_fraction"]
                    x0 = si - 0.4 + di * len(names) * width
                    ax.hlines(roof, x0, x0 + len(names) * width, colors="black", linewidth=1.5,
                              label="roofline" if si == 0 and di == 0 else None)
        ax.set_xticks(range(len(shapes)), [f"{s}\n(fp32 | bf16)" for s in shapes], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"{op}, the whole {model_name} model" if op == "forward" else f"{op}, one {model_name} layer",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    warning = trust_line(data["machine_info"])
    fig.suptitle(_machine(data) + ("\n" + warning.replace("**", "") if warning else ""), fontsize=8,
                 color="black" if warning is None else "red")
    fig.tight_layout()
    fig.savefig(png, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json output(s) to merge")
    parser.add_argument("--png", type=Path, help="write the chart here")
    parser.add_argument("--markdown", type=Path, help="write the table here (it is printed either way)")
    args = parser.parse_args(argv)
    data = _load(args.json)
    text = markdown(data)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.png:
        chart(data, args.png)
        print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KB)")
    violations = report.roof_violations(data["benchmarks"])
    if violations:
        print(f"error: {len(violations)} benchmark(s) beat the machine's roof, so a roof measurement is wrong: "
              + "; ".join(violations), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
