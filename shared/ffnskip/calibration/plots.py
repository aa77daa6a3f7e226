"""Figure 2 of the paper: per-layer cosine similarity of the hidden state across the FFN.

matplotlib is imported inside the function (Agg backend, no display) so that importing
ffnskip never pays for it and services that do not plot never load it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from ffnskip.errors import InvalidArgument
from ffnskip.profile import LayerStats


def plot_layer_similarity(
    layers: Sequence[LayerStats],
    cold_start: int,
    cold_end: int,
    title: str,
    threshold: float | None = None,
    skipped: Sequence[int] = (),
) -> bytes:
    """PNG bytes: mean cos(h, h + ffn(h)) per layer, a p05-p95 band, cold regions shaded,
    and a static profile's skipped FFNs marked."""
    if not layers:
        raise InvalidArgument("layers", "must not be empty")
    if not (0 <= cold_start < cold_end <= len(layers)):
        raise InvalidArgument("cold_end", f"need 0 <= cold_start < cold_end <= {len(layers)}, got {cold_start}, {cold_end}")

    # A bare Figure on an Agg canvas avoids pyplot's global state, so threads may plot at once.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = [stats.layer for stats in layers]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.fill_between(index, [s.p05 for s in layers], [s.p95 for s in layers], alpha=0.25, label="p05-p95")
    axes.plot(index, [s.mean for s in layers], marker="o", markersize=3, label="mean")
    _shade_cold_regions(axes, cold_start, cold_end, len(layers))
    if skipped:
        by_layer = {stats.layer: stats.mean for stats in layers}
        axes.scatter(list(skipped), [by_layer[i] for i in skipped], marker="x", s=60, color="red", zorder=3,
                     label="FFN always skipped (static)")
    if threshold is not None:
        axes.axhline(threshold, linestyle="--", linewidth=1, color="black", label=f"threshold {threshold:g}")
    axes.set_xlabel("layer")
    axes.set_ylabel("cos(h, h + FFN(h))")
    axes.set_title(title)
    axes.set_xlim(-0.5, len(layers) - 0.5)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower center")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _shade_cold_regions(axes, cold_start: int, cold_end: int, num_layers: int) -> None:
    # Half-layer margins so the shading covers the cold layers' markers, not stops at them.
    if cold_start > 0:
        axes.axvspan(-0.5, cold_start - 0.5, color="grey", alpha=0.2, label="cold (never skipped)")
    if cold_end < num_layers:
        label = None if cold_start > 0 else "cold (never skipped)"
        axes.axvspan(cold_end - 0.5, num_layers - 0.5, color="grey", alpha=0.2, label=label)
