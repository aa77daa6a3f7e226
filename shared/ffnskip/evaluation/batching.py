"""`ffnskip eval batching`: skipping inside a batch (docs/batching.md) from the outputs of
`ffnskip bench --json --batches ... --from-eval QA_JSON` and `ffnskip eval qa|agreement --json`.

Speed and quality pair up by setting name (`method@target`): the bench ran exactly the
parameters whose quality the evaluation measured. Prints markdown tables for docs/batching.md
and writes the trade-off plot: speedup over dense against agreement lost, per batch size.
"""

from __future__ import annotations

from pathlib import Path

from ffnskip.errors import InvalidArgument
from ffnskip.evaluation.methods import setting_name
from ffnskip.evaluation.plots import MARKERS, _figure, _png
from ffnskip.evaluation.report import load_output


def quality_by_name(qa: dict, agreement: dict | None) -> dict[str, dict]:
    """`method@target` -> accuracy (with its interval) from QA, agreement from the open prompts
    when given (else the QA answers' agreement)."""
    out: dict[str, dict] = {}
    for row in qa["rows"]:
        if row.get("label"):
            continue
        out[setting_name(row)] = {"decode_skip_ratio": row["decode_skip_ratio"], "accuracy": row["accuracy"], "ci95": row["ci95"],
                     "n": row["n"], "agreement": row["agreement"], "exact_match": row["exact_match"],
                     "repeated_4gram": row["repeated_4gram"], "settings": row.get("settings", ""), "source": "qa"}
    for row in (agreement or {}).get("rows", []):
        name = setting_name(row)
        if name in out and not row.get("label"):
            out[name].update(agreement=row["agreement"], exact_match=row["exact_match"],
                             repeated_4gram=row["repeated_4gram"], source="prompts")
    return out


def speed_table(bench: dict) -> str:
    lines = ["| setting | batch | decode skip | FFN reads avoided | tokens/s | vs dense | ideal | realised |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(bench["rows"], key=lambda r: (r["policy"] != "dense", r["policy"], r["batch"])):
        if r["policy"] == "hf_generate":
            continue
        realised = "-" if r["realised_fraction"] is None else f"{r['realised_fraction']:.2f}"
        lines.append(f"| {r['policy']} | {r['batch']} | {r['decode_skip_ratio']:.3f} | {r['avoided_ffn_read_share']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup_vs_dense']:.3f} | {r['ideal_speedup']:.3f} | {realised} |")
    return "\n".join(lines)


def quality_table(quality: dict[str, dict]) -> str:
    lines = ["| setting | decode skip | QA accuracy [95% CI] | agreement | exact match | repeated 4-grams | parameters |",
             "|---|---|---|---|---|---|---|"]
    for name, q in sorted(quality.items(), key=lambda kv: (kv[0] != "dense", kv[0].split("@")[-1], kv[0])):
        lines.append(f"| {name} | {q['decode_skip_ratio']:.3f} | {q['accuracy']:.3f} [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}] "
                     f"(n={q['n']}) | {q['agreement']:.3f} | {q['exact_match']:.3f} | {q['repeated_4gram']:.3f} | {q['settings']} |")
    return "\n".join(lines)


def tradeoff_plot(bench: dict, quality: dict[str, dict]) -> bytes:
    """Speedup over dense (same batch) against agreement lost, one colour per batch size."""
    figure = _figure(8.5, 5.2)
    axes = figure.add_subplot(1, 1, 1)
    batches = sorted({r["batch"] for r in bench["rows"]})
    colours = {b: f"C{i}" for i, b in enumerate(batches)}
    markers: dict[str, str] = {}
    for r in bench["rows"]:
        q = quality.get(r["policy"])
        if q is None or r["policy"] == "dense":
            continue
        method = r["policy"].split("@")[0]
        if method not in markers:  # one marker per policy (and per quorum): aligned_q50 "^", the next ">"...
            base = MARKERS.get(method.split("_q")[0] if method.startswith("aligned") else method, "o")
            markers[method] = base if base not in markers.values() else next(m for m in "><dph*" if m not in markers.values())
        axes.scatter(1 - q["agreement"], r["speedup_vs_dense"], marker=markers[method], s=50, color=colours[r["batch"]])
        axes.annotate(f"{r['policy'].split('@')[1]} b{r['batch']}", (1 - q["agreement"], r["speedup_vs_dense"]),
                      fontsize=6, xytext=(3, 2), textcoords="offset points")
    for method, marker in markers.items():
        axes.scatter([], [], marker=marker, color="black", label=method)
    for b in batches:
        axes.scatter([], [], color=colours[b], label=f"batch {b}")
    axes.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    axes.set_xlabel("agreement lost against dense (1 - token agreement)")
    axes.set_ylabel("tokens/s over dense at the same batch size")
    axes.set_title("Skipping inside a batch: speed against quality (marker = policy, colour = batch)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return _png(figure)


def write(bench_path: Path, qa_path: Path, agreement_path: Path | None, plots: Path) -> str:
    bench, qa, agreement = load_output(bench_path, "bench"), load_output(qa_path, "qa"), load_output(agreement_path, "agreement")
    quality = quality_by_name(qa, agreement)
    missing = sorted(r["policy"] for r in bench["rows"] if "@" in r["policy"] and r["policy"] not in quality)
    if missing:
        raise InvalidArgument("qa", f"{qa_path} has no quality rows for the bench rows {missing}")
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "batching_tradeoff.png").write_bytes(tradeoff_plot(bench, quality))
    header = (f"Speed: {bench['model']} on {bench['device']} ({bench['dtype']}, {bench['threads']} threads), "
              f"{bench['new_tokens']} new tokens per sequence, median of {bench['reps']} interleaved reps; "
              f"ideal and realised use the measured skip ratio over all generated tokens (F/W = {bench['ffn_share']:.3f}).")
    source = "agreement on the open prompts" if agreement else "agreement of the QA answers"
    return "\n\n".join([header, speed_table(bench),
                        f"Quality: factoid QA (n per row below) and {source}, decoded in batches of {qa.get('batch_size')}.",
                        quality_table(quality), f"Plot: {plots / 'batching_tradeoff.png'}"]) + "\n"
