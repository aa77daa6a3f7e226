"""The evaluation's figures (PNG bytes, matplotlib Agg without pyplot, like ffnskip.calibration.plots):
accuracy and agreement against the measured skip ratio per method, the warm-up ablation,
and tokens/s against the skip ratio with the ideal line from `ffnskip bench --json`."""

from __future__ import annotations

import io

MARKERS = {"dense": "*", "random": "x", "non_adaptive": "s", "adaptive": "o", "aligned": "^",
           "adaptive_window": "D", "static": "v", "layer_drop": "P"}


def _figure(width: float = 8.0, height: float = 4.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        if not row.get("label"):
            out.setdefault(row["method"], []).append(row)
    return {m: sorted(r, key=lambda r: r["decode_skip_ratio"]) for m, r in out.items()}


def accuracy_vs_skip(qa: dict) -> bytes:
    """QA accuracy (95% interval as error bars) against the measured decode skip ratio."""
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    groups = _by_method(qa["rows"])
    dense = groups.pop("dense", [None])[0]
    if dense:
        axes.axhline(dense["accuracy"], color="black", linewidth=1, label=f"dense {dense['accuracy']:.3f}")
        axes.axhspan(dense["ci95"][0], dense["ci95"][1], color="grey", alpha=0.15, label="dense 95% CI")
    for method, rows in groups.items():
        x = [r["decode_skip_ratio"] for r in rows]
        y = [r["accuracy"] for r in rows]
        err = [[r["accuracy"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["accuracy"] for r in rows]]
        axes.errorbar(x, y, yerr=err, marker=MARKERS.get(method.split("_q")[0], "o"), capsize=3, label=method, alpha=0.85)
    axes.set_xlabel("measured decode FFN skip ratio (layer_drop: share of layers removed)")
    axes.set_ylabel("factoid QA accuracy")
    axes.set_title(f"{qa['model']}: accuracy vs skip ratio ({qa['n_items']} questions, greedy)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return _png(figure)


def agreement_vs_skip(qa: dict, agreement: dict | None) -> bytes:
    """Token agreement with dense on the QA answers and (if given) on the open prompts."""
    panels = [("QA answers", qa)] + ([("open prompts", agreement)] if agreement else [])
    figure = _figure(width=6.0 * len(panels), height=4.5)
    for index, (name, report) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for method, rows in _by_method(report["rows"]).items():
            if method == "dense":
                continue
            axes.plot([r["decode_skip_ratio"] for r in rows], [r["agreement"] for r in rows],
                      marker=MARKERS.get(method.split("_q")[0], "o"), label=method)
        axes.set_xlabel("measured decode FFN skip ratio")
        axes.set_ylabel("token agreement with dense")
        axes.set_title(f"{name} ({report['n_items']})")
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return _png(figure)


def warmup_plot(warmup: dict) -> bytes:
    """Quality against warm-up tokens at one target ratio (the paper's Figure 5 shape)."""
    rows = [r for r in warmup["rows"] if r["warm_up"] is not None]
    x = [r["warm_up"] for r in rows]
    figure = _figure(width=7.5)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(x, [r["agreement"] for r in rows], marker="o", label="token agreement (prompts)")
    axes.plot(x, [r["repeated_4gram"] for r in rows], marker="x", label="repeated 4-gram share (prompts)")
    dense = next((r for r in warmup["rows"] if r["warm_up"] is None), None)
    if dense is not None:
        axes.axhline(dense["repeated_4gram"], color="grey", linestyle=":", label="dense repeated 4-grams")
    if rows and "qa_accuracy" in rows[0]:
        axes.errorbar(x, [r["qa_accuracy"] for r in rows], marker="s",
                      yerr=[[r["qa_accuracy"] - r["qa_ci95"][0] for r in rows], [r["qa_ci95"][1] - r["qa_accuracy"] for r in rows]],
                      capsize=3, label="QA accuracy")
        if dense is not None:
            axes.axhline(dense["qa_accuracy"], color="black", linewidth=1, label="dense QA accuracy")
    axes.set_xlabel("warm-up tokens (generated in full before skipping starts)")
    axes.set_ylabel("share")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"warm-up ablation: {warmup['method']} at target decode skip {warmup['target_skip']:.2f}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def speed_vs_skip(bench: dict) -> bytes:
    """Measured tokens/s per bench row against its skip ratio, with the ideal
    dense / (1 - r F/W) line per batch size (the ideal speedup of README "Numbers")."""
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    share = bench["ffn_share"]
    rows = [r for r in bench["rows"] if r["policy"] != "hf_generate"]
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        dense = next((r for r in mine if r["policy"] == "dense"), None)
        points = axes.scatter([r["skip_ratio"] for r in mine], [r["tokens_per_s"] for r in mine], label=f"measured, batch {batch}")
        for r in mine:
            axes.annotate(r["policy"], (r["skip_ratio"], r["tokens_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if dense is not None:
            top = max(r["skip_ratio"] for r in mine) or 0.3
            xs = [top * i / 20 for i in range(21)]
            axes.plot(xs, [dense["tokens_per_s"] / (1 - x * share) for x in xs], linestyle="--",
                      color=points.get_facecolor()[0], label=f"ideal, batch {batch} (F/W = {share:.3f})")
    axes.set_xlabel("measured FFN skip ratio (all generated tokens)")
    axes.set_ylabel("decode tokens/s")
    axes.set_title(f"{bench['model']} on {bench['device']} ({bench['dtype']}, {bench['threads']} threads): speed vs skip ratio")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def layer_similarity(calibration: dict, threshold: float | None, model: str) -> bytes:
    from ffnskip.calibration.plots import plot_layer_similarity
    from ffnskip.profile import LayerStats

    layers = [LayerStats(**layer) for layer in calibration["layers"]]
    title = f"{model}: cos(h, h + ffn(h)) per layer ({calibration['measured_prompts']} calibration prompts)"
    return plot_layer_similarity(layers, calibration["cold_start"], calibration["cold_end"], title, threshold=threshold)
