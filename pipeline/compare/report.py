"""Tables and plots of a compare run: leaderboard CSV/Markdown, PNG plots, HTML.

Everything here reads the ``results`` dict that :func:`pipeline.compare.run_compare`
builds (and writes as ``results.json``), so a report can be redrawn from that file alone.
The one-line-per-run history is :mod:`pipeline.compare.history`.
Plots use matplotlib's object API (``Figure``, no pyplot): it renders with Agg and needs
no display, so it works on a headless machine and in worker threads.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.util.files import write_json_atomic

__all__ = [
    "LEADERBOARD_COLUMNS",
    "accuracy_figure",
    "best_pair",
    "leaderboard_markdown",
    "markdown_table",
    "number_cell",
    "plot_accuracy",
    "plot_confusion",
    "plot_depth",
    "plot_per_class_f1",
    "run_settings",
    "settings_rows",
    "write_report",
]

LEADERBOARD_COLUMNS = (
    "rank",
    "label",
    "base",
    "head",
    "params",
    "accuracy_mean",
    "accuracy_std",
    "macro_f1",
    "test_accuracy",
    "test_macro_f1",
    "fit_seconds",
    "predict_ms_per_image",
    "model_bytes",
    "n_folds",
    "cache",
    "status",
    "reason",
    "notes",
)
# Cell counts are written into the confusion matrix only while they stay readable.
_ANNOTATE_MAX_CLASSES = 20


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """A Markdown table, padded so it also reads well as plain text.

    Args:
        header: column titles.
        rows: cells, already formatted.
        align: one letter per column, ``l`` (text) or ``r`` (numbers); default: all ``l``.

    Returns:
        The table, one line per row.

    Raises:
        ValueError: ``align`` has another length than ``header`` or other letters.
    """
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(
            f"`align` must have one 'l' or 'r' per column ({len(header)}). Received: "
            f"align={align!r}"
        )
    cells = [list(header), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    dashes = [
        "-" * (w + 2) if a == "l" else "-" * (w + 1) + ":"
        for w, a in zip(widths, align, strict=True)
    ]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _has_test(rows: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("test_accuracy") is not None for r in rows)


def _accuracy_heading(results: dict[str, Any]) -> str:
    """What the accuracy column holds, by the run's protocol."""
    if results.get("protocol_kind") == "validation":
        return "validation accuracy"
    return f"accuracy (mean ± std, {results['folds']['k']} folds)"


def _table_cells(
    rows: Sequence[dict[str, Any]], results: dict[str, Any]
) -> tuple[list[str], list[str], str]:
    """Header, formatted cells and alignment of the leaderboard, for Markdown and HTML."""
    test = _has_test(rows)
    validation = results.get("protocol_kind") == "validation"
    header = ["#", "features", "head", "params", _accuracy_heading(results), "macro-F1"]
    header += ["test accuracy", "test macro-F1"] if test else []
    header += ["fit s", "predict ms/img", "model bytes", "cache"]
    align = "rlllrr" + ("rr" if test else "") + "rrrl"
    body = []
    for r in rows:
        accuracy = f"{r['accuracy_mean']:.4f}"
        if not validation:
            accuracy += f" ± {r['accuracy_std']:.4f}"
        cells = [
            str(r["rank"]),
            r["label"],
            r["head"],
            r["params"] or "defaults",
            accuracy,
            f"{r['macro_f1']:.4f}",
        ]
        if test:
            cells += [number_cell(r.get("test_accuracy")), number_cell(r.get("test_macro_f1"))]
        cells += [
            f"{r['fit_seconds']:.3f}",
            f"{r['predict_ms_per_image']:.4f}",
            f"{r['model_bytes']:,}",
            Path(r["cache"]).name,
        ]
        body.append(cells)
    return header, body, align


def number_cell(value: float | None) -> str:
    """A score as a table cell: four decimals, or a dash when there is none."""
    return "—" if value is None else f"{value:.4f}"


def _notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [f"{r['label']} / {r['head']}: {r['notes']}" for r in rows if r.get("notes")]


def _rows_line(results: dict[str, Any]) -> str:
    """The first line of a report: rows, classes and the protocol, in plain words."""
    test = f", {results['n_test']} of them held out as test rows" if results["n_test"] else ""
    return (f"{results['n_rows']} rows{test}, {len(results['class_names'])} classes. "
            f"{results['protocol']}")


def settings_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The compared caches' settings as table cells: one row per cache (and layer).

    Args:
        results: a compare ``results`` dict.

    Returns:
        ``(header, rows)``.
    """
    header = ["features", "file", "base", "layer", "pooling", "input size", "weights",
              "computed", "data folder", "rows", "classes", "extracted"]
    rows = []
    for c in results["caches"]:
        size = c.get("input_size")
        rows.append([
            c.get("label") or "", Path(c["path"]).name, str(c.get("base")), str(c.get("layer")),
            str(c.get("pooling")),
            "x".join(str(v) for v in size) if size else "?", str(c.get("weights")),
            str(c.get("computed") or "?"), str(c.get("data_dir") or "?"),
            str(c.get("n_rows")), str(c.get("n_classes")), str(c.get("created") or "?"),
        ])
    return header, rows


def run_settings(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The compare run's own settings as (name, value) pairs, for the report page.

    Args:
        results: a compare ``results`` dict.

    Returns:
        The pairs, in reading order.
    """
    config = results["config"]
    folds = results["folds"]
    return [
        ("run started", results["started"]),
        ("heads", ", ".join(config["heads"]) + (" + scratch convnet" if config["scratch"]
                                                  else "")),
        ("protocol", results["protocol"]),
        ("folds", str(folds["k"]) if results.get("protocol_kind") != "validation"
         else "1 (the recorded train/validation split)"),
        ("sweep", "yes: each head's regularisation from a small grid" if config["sweep"]
         else "no: library defaults"),
        ("seed", str(config["seed"])),
        ("class weight", config.get("class_weight") or "none"),
        ("dense head epochs (max)", str(config["epochs"])),
        ("layers", config.get("layers") or "each cache's default"),
        ("seconds", f"{results['seconds']:.1f}"),
    ]


def leaderboard_markdown(results: dict[str, Any]) -> str:
    """The leaderboard (and skipped pairs with their reasons) as a Markdown document.

    Args:
        results: a compare ``results`` dict.

    Returns:
        Markdown text.
    """
    lines = [
        f"# Leaderboard: {results['out_dir']}",
        "",
        _rows_line(results),
        "",
    ]
    if results["leaderboard"]:
        lines.append(markdown_table(*_table_cells(results["leaderboard"], results)))
    else:
        lines.append("Nothing could be scored.")
    notes = _notes(results["leaderboard"])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if results["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {s['label']} / {s['head']} ({Path(s['cache']).name}): {s['reason']}"
                  for s in results["skipped"]]
    header, rows = settings_rows(results)
    lines += ["", "Caches:", "", markdown_table(header, rows)]
    lines += ["", "Settings:", ""] + [f"- {k}: {v}" for k, v in run_settings(results)]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, results: dict[str, Any]) -> Path:
    """Every pair, scored ones first in rank order; full precision, sizes in bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LEADERBOARD_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in results["leaderboard"]:
        writer.writerow({**row, "status": "ok", "reason": ""})
    for row in results["skipped"]:
        writer.writerow({**row, "status": "skipped"})
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def _entry_of(results: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The pair entry behind a leaderboard row (one cache can hold several layers)."""
    return next(p for p in results["pairs"]
                if (p["cache"], p["label"], p["head"]) == (row["cache"], row["label"], row["head"]))


def best_pair(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str] | None:
    """The top pair's entry, the metrics to plot for it, and which rows they come from.

    Args:
        results: a compare ``results`` dict.

    Returns:
        ``(pair entry, metrics, "test" | "validation" | "out-of-fold")``: the test metrics
        when a test split was scored, else the predictions of the scored rows (the
        validation rows, or every row predicted by the fold that held it out); None when
        nothing was scored.
    """
    if not results["leaderboard"]:
        return None
    entry = _entry_of(results, results["leaderboard"][0])
    test = entry.get("test")
    if test and "error" not in test:
        return entry, test, "test"
    rows = "validation" if results.get("protocol_kind") == "validation" else "out-of-fold"
    return entry, entry["out_of_fold"], rows


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


# Inches a tick label takes per character at the default 10 pt font (DejaVu Sans averages
# ~0.6 em; 0.085" is wider than that), so the figure is always wide enough for its labels.
_INCH_PER_CHAR = 0.085
# Inches of the bar area.
_BARS_INCH = 4.5


def _title_inch(title: str) -> float:
    """Inches a plot title needs (its longest line), so a long pair label is never cut."""
    return 0.5 + _INCH_PER_CHAR * max(len(line) for line in title.splitlines())


def accuracy_figure(rows: Sequence[dict[str, Any]], *, folds: int | None) -> Any:
    """The accuracy plot as a matplotlib ``Figure``: one bar per pair, best on top.

    Bars are the mean accuracy over the folds (whiskers ± std) or, with ``folds=None``,
    the validation accuracy; test accuracies are black dots. The exact values are printed
    in a column right of the bars, one line per bar, so they never cover a bar or each
    other. The figure is as wide as its longest label needs (labels are never clipped),
    and when the axis does not start at 0 its label says so.

    Args:
        rows: leaderboard rows, in rank order (``label``, ``head``, ``accuracy_mean``,
            ``accuracy_std``, ``test_accuracy``).
        folds: the number of folds, or None for a recorded validation split.

    Returns:
        The figure (not saved).
    """
    labels = [f"{r['label']} / {r['head']}" for r in rows]
    means = np.array([r["accuracy_mean"] for r in rows])
    stds = np.array([r["accuracy_std"] for r in rows])
    tests = [r.get("test_accuracy") for r in rows]
    values = [
        f"{mean:.4f}" + (f" ± {std:.4f}" if folds else "")
        + (f"  (test {t:.4f})" if t is not None else "")
        for mean, std, t in zip(means, stds, tests, strict=True)
    ]
    label_inch = _INCH_PER_CHAR * max(len(label) for label in labels)
    # The values are printed in a smaller font (8.3 pt): ~0.85 of a label character.
    values_inch = 0.3 + 0.85 * _INCH_PER_CHAR * max(len(v) for v in values)
    fig = _figure(label_inch + _BARS_INCH + values_inch, 1.5 + 0.35 * len(rows))
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, means, xerr=stds if folds else None, color="#4c78a8", ecolor="#333333",
            capsize=3)
    xlabel = (f"accuracy: bars = mean over the {folds} folds, whiskers = ± std" if folds
              else "accuracy on the validation rows")
    if any(t is not None for t in tests):
        ax.plot([np.nan if t is None else t for t in tests], y, "o", color="black")
        xlabel += ", dots = test"
    for yi, text in zip(y, values, strict=True):
        # x in axes coordinates, y in data: a column right of the plot, one line per bar.
        ax.text(1.02, yi, text, transform=ax.get_yaxis_transform(), va="center", ha="left",
                fontsize="small")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # rank 1 on top
    # Zoom on the range where the pairs differ (rounded down to a multiple of 0.05); the
    # axis label then says so, as the bars no longer show the accuracies' ratios.
    lowest = min([float(np.min(means - stds)), *(t for t in tests if t is not None)])
    low = max(0.0, np.floor((lowest - 0.02) * 20) / 20)
    high = max(1.0, float(np.max(means + stds))) + 0.005
    ax.set_xlim(low, high)
    if low > 0:
        xlabel += f"\nnote: the axis starts at {low:.2f}, not at 0"
    ax.set_xlabel(xlabel, fontsize="small")
    ax.set_title("Accuracy per (features, head)")
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path, *, folds: int | None) -> Path:
    """Write :func:`accuracy_figure` as a PNG.

    Args:
        rows: leaderboard rows, in rank order.
        path: the PNG to write.
        folds: the number of folds, or None for a recorded validation split.

    Returns:
        ``path``.
    """
    accuracy_figure(rows, folds=folds).savefig(path)
    return path


def plot_depth(
    rows: Sequence[dict[str, Any]],
    order: Sequence[str],
    path: Path,
    *,
    ylabel: str = "mean CV accuracy (± std)",
) -> Path:
    """Accuracy of each head against the layer it read (``base @ layer`` rows),
    layers in the order the cache stores them (bottom to top for ``all-blocks``).

    Args:
        rows: leaderboard rows whose ``base`` names a layer.
        order: the ``base @ layer`` labels in depth order.
        path: the PNG to write.
        ylabel: what the accuracy axis shows (by the run's protocol).

    Returns:
        ``path``.
    """
    order = [label for label in dict.fromkeys(order) if any(r["base"] == label for r in rows)]
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    for head in dict.fromkeys(r["head"] for r in rows):
        points = sorted((order.index(r["base"]), r["accuracy_mean"], r["accuracy_std"])
                        for r in rows if r["head"] == head)
        x, mean, std = (np.array(v) for v in zip(*points, strict=True))
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=head)
    ax.set_xticks(range(len(order)), [b.split(" @ ", 1)[1] for b in order], rotation=30,
                  ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.set_title("Accuracy by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def plot_confusion(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), counts in the cells.

    Args:
        matrix: square counts in ``class_names`` order.
        class_names: names of the classes.
        path: the PNG to write.
        title: the plot title.

    Returns:
        ``path``.
    """
    cm = np.asarray(matrix)
    n = len(class_names)
    side = min(12.0, 2.5 + 0.45 * n)
    fig = _figure(max(side + 1.0, _title_inch(title)), side)
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(n)
    ax.set_xticks(ticks, class_names, rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(title, fontsize="medium")  # centred on the figure, which fits it
    if n <= _ANNOTATE_MAX_CLASSES:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize="small",
                        color="white" if cm[i, j] > threshold else "black")
    fig.savefig(path)
    return path


def plot_per_class_f1(per_class: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Bars of each class's F1, worst class first, support in the label.

    Args:
        per_class: class name -> ``{"f1-score", "support", ...}`` (as :func:`evaluate`).
        path: the PNG to write.
        title: the plot title.

    Returns:
        ``path``.
    """
    items = sorted(per_class.items(), key=lambda kv: kv[1]["f1-score"])
    fig = _figure(max(7.0, _title_inch(title)), 1.2 + 0.3 * len(items))
    ax = fig.add_subplot()
    y = np.arange(len(items))
    f1 = [v["f1-score"] for _, v in items]
    ax.barh(y, f1, color="#f58518")
    for yi, value in zip(y, f1, strict=True):
        ax.text(value, yi, f" {value:.3f}", va="center", ha="left", fontsize="x-small")
    ax.set_yticks(y, [f"{name} (n={int(v['support'])})" for name, v in items])
    ax.set_xlim(0.0, 1.1)
    ax.set_xlabel("F1")
    fig.suptitle(title, fontsize="medium")  # centred on the figure, which fits it
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path)
    return path


# Confusion matrices up to this many classes are shown whole; larger ones as their
# most frequent confusions (a 100 x 100 table in every pair's box helps nobody).
_TABLE_MAX_CLASSES = 30
_TOP_CONFUSIONS = 10


def _confusion_html(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """A confusion matrix as an HTML table (rows: true, columns: predicted), cells shaded
    by their share of the row; with many classes, the most frequent confusions instead."""
    esc = html.escape
    cm = np.asarray(matrix, dtype=np.int64)
    if len(class_names) > _TABLE_MAX_CLASSES:
        off = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm))
               if i != j and cm[i, j]]
        off.sort(key=lambda t: -t[0])
        if not off:
            return "<p>No confusions.</p>"
        return "<p>Most frequent confusions (true → predicted):</p><ul>" + "".join(
            f"<li>{esc(class_names[i])} → {esc(class_names[j])}: {n}</li>"
            for n, i, j in off[:_TOP_CONFUSIONS]) + "</ul>"
    totals = np.maximum(cm.sum(axis=1), 1)
    head = "".join(f"<th>{esc(name)}</th>" for name in class_names)
    parts = ['<table class="cm"><tr><th>true \\ predicted</th>' + head + "</tr>"]
    for i, name in enumerate(class_names):
        cells = []
        for j in range(len(class_names)):
            share = cm[i, j] / totals[i]
            colour = "76,120,168" if i == j else "228,87,86"
            cells.append(f'<td class="num" style="background:rgba({colour},{share:.2f})">'
                         f"{cm[i, j]}</td>")
        parts.append(f"<tr><th>{esc(name)}</th>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def _pair_confusions(results: dict[str, Any]) -> list[str]:
    """One collapsed box per scored pair, in rank order: its confusion matrices."""
    esc = html.escape
    validation = results.get("protocol_kind") == "validation"
    scored_rows = ("validation rows" if validation
                   else "rows, each predicted by the fold that held it out")
    parts = []
    for row in results["leaderboard"]:
        entry = _entry_of(results, row)
        oof = entry["out_of_fold"]
        n = int(np.sum(oof["confusion_matrix"]))
        parts.append(
            f"<details><summary>#{row['rank']} {esc(row['label'])} / {esc(row['head'])}: "
            f"accuracy {oof['accuracy']:.4f} on {n} {scored_rows}</summary>"
            + _confusion_html(oof["confusion_matrix"], results["class_names"])
        )
        test = entry.get("test")
        if test and "error" not in test:
            parts.append(f"<p>Test rows ({test['n_test']}): accuracy {test['accuracy']:.4f}"
                         "</p>" + _confusion_html(test["confusion_matrix"],
                                                  results["class_names"]))
        parts.append("</details>")
    return parts


def _html(results: dict[str, Any], images: dict[str, tuple[str, str]]) -> str:
    """The report page: leaderboard, skipped pairs, plots, confusion matrices, settings."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>compare: {esc(results['out_dir'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "td.num{text-align:right}table.cm{margin:0.5em 0 1em 0;font-size:small}"
        "details{margin:0.3em 0}summary{cursor:pointer}"
        "img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
        "<h1>Leaderboard</h1>",
        f"<p>{esc(_rows_line(results))}</p>",
    ]
    if results["leaderboard"]:
        header, body, align = _table_cells(results["leaderboard"], results)
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += [
            "<tr>" + "".join(
                f'<td class="{"num" if a == "r" else "txt"}">{esc(c)}</td>'
                for c, a in zip(row, align, strict=True)
            ) + "</tr>"
            for row in body
        ]
        parts.append("</table>")
    else:
        parts.append("<p><strong>Nothing could be scored.</strong></p>")
    notes = _notes(results["leaderboard"])
    if notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{esc(n)}</li>" for n in notes]
        parts.append("</ul>")
    if results["skipped"]:
        parts.append("<h2>Skipped</h2><ul>")
        parts += [f"<li>{esc(s['label'])} / {esc(s['head'])}: {esc(s['reason'])}</li>"
                  for s in results["skipped"]]
        parts.append("</ul>")
    for name, (heading, alt) in images.items():
        parts.append(f"<h2>{esc(heading)}</h2>")
        parts.append(f'<img src="{esc(name)}" alt="{esc(alt)}">')
    if results["leaderboard"]:
        parts.append("<h2>Confusion matrices, every pair</h2>")
        parts += _pair_confusions(results)
    header, rows = settings_rows(results)
    parts += [
        "<h2>Settings</h2>",
        "<h3>Caches</h3>",
        "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows),
        "</table>",
        "<h3>This run</h3>",
        "<table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in run_settings(results)),
        "</table>",
        "<details><summary>Configuration as given (config)</summary>",
        f"<pre>{esc(json.dumps(results['config'], indent=2))}</pre></details>",
        "<p>Every number, with per-fold scores of every grid point: "
        '<a href="results.json">results.json</a>.</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(out_dir: str | os.PathLike, results: dict[str, Any]) -> dict[str, Path]:
    """Write the leaderboard, plots, ``results.json`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: the report folder (created if missing; files in it are replaced).
        results: a compare ``results`` dict; its ``outputs`` key is set here.

    Returns:
        Output name -> path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "leaderboard.csv": _write_csv(out_dir / "leaderboard.csv", results),
        "leaderboard.md": out_dir / "leaderboard.md",
    }
    outputs["leaderboard.md"].write_text(leaderboard_markdown(results), encoding="utf-8")
    images: dict[str, tuple[str, str]] = {}
    if results["leaderboard"]:
        folds = None if results.get("protocol_kind") == "validation" else results["folds"]["k"]
        outputs["accuracy.png"] = plot_accuracy(results["leaderboard"], out_dir / "accuracy.png",
                                                folds=folds)
        images["accuracy.png"] = ("Accuracy", "accuracy per pair")
    depth = [r for r in results["leaderboard"] if " @ " in r["base"]]
    if len({r["base"] for r in depth}) > 1:
        order = [f"{Path(str(c['base'])).name} @ {c['layer']}" for c in results["caches"]]
        outputs["depth.png"] = plot_depth(depth, order, out_dir / "depth.png",
                                          ylabel=_accuracy_heading(results))
        images["depth.png"] = ("Accuracy by depth", "accuracy per stored layer")
    best = best_pair(results)
    if best is not None:
        entry, metrics, rows = best
        pair = f"{entry['label']} / {entry['head']}"
        n_rows = int(np.sum(metrics["confusion_matrix"]))
        where = f"{rows} predictions, {n_rows} rows"
        outputs["confusion.png"] = plot_confusion(
            metrics["confusion_matrix"], results["class_names"], out_dir / "confusion.png",
            f"{pair}\nconfusion matrix ({where})",
        )
        outputs["per_class_f1.png"] = plot_per_class_f1(
            metrics["per_class"], out_dir / "per_class_f1.png", f"{pair}\nF1 per class ({where})"
        )
        images["confusion.png"] = (f"Best pair: {pair}, confusion matrix ({where})",
                                   "confusion matrix of the best pair")
        images["per_class_f1.png"] = (f"Best pair: {pair}, F1 per class",
                                      "per-class F1 of the best pair")
    outputs["results.json"] = out_dir / "results.json"
    outputs["report.html"] = out_dir / "report.html"
    results["outputs"] = sorted(outputs)
    write_json_atomic(outputs["results.json"], results)
    outputs["report.html"].write_text(_html(results, images), encoding="utf-8")
    return outputs

