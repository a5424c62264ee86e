"""The profiler's outputs: NAME.md (tables and recommendation), NAME.json (every sample), NAME.png (curves)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .profile_analysis import STATS, tidar_query_tokens


def _fmt_bl(rec) -> str:
    if rec["block_length"] is None:
        return "none"
    return f"{rec['block_length']}" + (" (grid limit)" if rec["capped"] else "")


def write_markdown(result: dict, path: Path) -> None:
    meta, points, an = result["meta"], result["points_by_key"], result["analysis"]
    contexts = sorted({c for c, _, _ in points})
    batches = sorted({b for _, b, _ in points})
    qs = sorted({q for _, _, q in points})
    tol, stat = meta["tolerance"], meta["stat"]
    lines = [
        f"# Free token slots: forward latency vs query tokens per request ({meta['backend']} backend)",
        "",
        f"- Machine: **{meta['machine']}**",
        f"- Model: {meta['model']} ({meta['dtype']}); backend `{meta['backend']}`"
        + (f", model class `{meta['model_class']}`, attention `{meta['attention_backend']}`" if meta.get("model_class") else ""),
        f"- Measured {meta['date']}: {meta['repeats']} timed runs per point ({meta['stat']} shown), {meta['warmup']} warm-up; "
        f"{meta['elapsed_s']:.0f} s in all; torch threads in the forward: {meta.get('torch_threads_in_forward')}"
        + (f"; load average (1/5/15 min) {meta['load_average']['start']} at start, {meta['load_average']['end']} at end"
           if (meta.get("load_average") or {}).get("start") else ""),
        f"- Latency = {meta['timed']}",
        f"- Command: `{meta['command']}`",
    ]
    if meta.get("beyond_trained_length"):
        lines.append(f"- Positions beyond the checkpoint's trained length ({meta['trained_max_position_embeddings']}) "
                     "were enabled (hf_overrides): outputs there are meaningless, the cost is real.")
    if meta.get("note"):
        lines.append(f"- {meta['note']}")
    lines += ["", "Latency in ms (x = ratio to q = 1). TiDAR's L = Bl(1+Bl): " + ", ".join(
        f"Bl={bl}: {tidar_query_tokens(bl)}" for bl in range(2, 23) if tidar_query_tokens(bl) <= max(qs)) + "."]
    for b in batches:
        lines += ["", f"## Batch {b}", "", "| q | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
                  "|---:|" + "---:|" * len(contexts)]
        for q in qs:
            cells = []
            for c in contexts:
                p = points.get((c, b, q))
                if p is None:
                    cells.append("")
                    continue
                base = STATS[stat](points[(c, b, qs[0])]["samples_ms"])
                med = STATS[stat](p["samples_ms"])
                cells.append(f"{med:.2f} ({med / base:.2f}x)")
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
    lines += ["", f"## Recommended block length (tolerance {tol:.0%})", "",
              f"Largest Bl with latency(q = Bl(1+Bl)) <= (1 + {tol:g}) x latency(q = 1), on a non-decreasing fit of "
              f"the {stat} latencies; q = L between grid points is " + ("interpolated linearly." if meta["interpolate"] else
                                                             "not judged (grid points only)."),
              "", "| context | batch | latency q=1 (ms) | Bl | L | latency at L (ms) | ratio | next Bl: ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (c, b), rec in sorted(an["per_setting"].items()):
        nxt = next((x for x in rec["candidates"] if not x["ok"]), None)
        lat = "" if rec["latency_at_L_ms"] is None else f"{rec['latency_at_L_ms']:.2f}" + ("" if rec["measured"] else " (interp.)")
        ratio = "" if rec["ratio"] is None else f"{rec['ratio']:.2f}"
        nxt_s = f"Bl={nxt['block_length']}: {nxt['ratio']:.2f}" if nxt else "-"
        lines.append(f"| {c} | {b} | {rec['baseline_ms']:.2f} | {_fmt_bl(rec)} | {rec['L'] or ''} | {lat} | {ratio} | {nxt_s} |")
    ov = an["overall"]
    if ov["block_length"] is None:
        verdict = ("**none**: even Bl = 2 (L = 6) costs more than the tolerance over a 1-token forward in "
                   f"setting ctx {ov['setting'][0]}, batch {ov['setting'][1]}: no free token slots here")
    else:
        verdict = f"**Bl = {ov['block_length']}** (L = {ov['L']}), set by ctx {ov['setting'][0]}, batch {ov['setting'][1]}"
    lines += ["", f"**Overall ({ov['rule']}):** {verdict}.", ""]
    path.write_text("\n".join(lines))


def write_plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    meta, points, an = result["meta"], result["points_by_key"], result["analysis"]
    contexts = sorted({c for c, _, _ in points})
    batches = sorted({b for _, b, _ in points})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    ov = an["overall"]
    for ax, b in zip(axes[0], batches):
        for c in contexts:
            qs = sorted(q for cc, bb, q in points if (cc, bb) == (c, b))
            meds = [STATS[meta["stat"]](points[(c, b, q)]["samples_ms"]) for q in qs]
            (line,) = ax.plot(qs, meds, marker="o", ms=3, label=f"ctx {c}")
            rec = an["per_setting"][(c, b)]
            ax.axhline(rec["threshold_ms"], color=line.get_color(), ls=":", lw=0.8)
            if rec["block_length"] is not None:
                ax.plot([rec["L"]], [rec["latency_at_L_ms"]], marker="*", ms=12, color=line.get_color(),
                        markeredgecolor="black", zorder=5)
        if ov["L"]:
            ax.axvline(ov["L"], color="gray", ls="--", lw=1, label=f"recommended L={ov['L']} (Bl={ov['block_length']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("query tokens per request (q)")
        ax.set_ylabel("forward latency (ms)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['model']} on {meta['machine']} ({meta['backend']}, {meta['dtype']}); "
                 f"* = largest Bl within {meta['tolerance']:.0%} (dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _jsonable(result: dict) -> dict:
    stat = STATS[result["meta"]["stat"]]
    pts = [dict(context=c, batch=b, q=q, latency_ms=stat(p["samples_ms"]), min_ms=min(p["samples_ms"]), **p)
           for (c, b, q), p in sorted(result["points_by_key"].items())]
    per = []
    for (c, b), rec in sorted(result["analysis"]["per_setting"].items()):
        r = dict(rec)
        r["fit"] = [dict(q=q, latency_ms=v) for q, v in rec["fit"].items()]
        per.append(dict(context=c, batch=b, **r))
    return dict(meta=result["meta"], points=pts, recommendations=per, overall=result["analysis"]["overall"])


def write_outputs(result: dict, out_dir, name: str) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / f"{name}.md", "json": out / f"{name}.json", "png": out / f"{name}.png"}
    (files["json"]).write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    write_markdown(result, files["md"])
    if not write_plot(result, files["png"]):
        print("profile: matplotlib is not installed: no plot", file=sys.stderr)
        del files["png"]
    return files
