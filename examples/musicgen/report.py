"""results.json -> report.html: one self-contained page (inline PNG figures and WAV players).

The page opens with the command that made the run (once) and, on a run that is not at the paper's
sizes, a banner (``run_scale``): *toy* runs (the smoke preset, or checkpoints far smaller than
MusicGen-small) prove the plumbing, not quality; *stand-in* runs (the mini world) compare variants
with each other, not with the paper. Sections (each has an ``id`` the tests look for):

- ``headline``: the paper's figures (FAD 7.05, CLAP 0.343, 55% smaller, 93% retained) and kdq's,
  side by side only where the comparison means something (``headline_rows``: a run at real size and,
  for FAD and CLAP, the paper's embedder); each kdq cell names its embedder;
- ``ablation``: every variant's bytes, size against fp32, FAD, CLAP score, held-out NLL, KL to the
  teacher and retention (skipped variants say why);
- ``figures``: training curves, one panel per quantity (cross-entropy pretraining, cross-entropy
  fine-tuning, the distillation loss with its temperature); size against quality with both plans on
  the planner's Pareto frontier, and the variants measured (a legend, not labels that overlap); the
  per-module sensitivity heat map;
- ``ort``: the ONNX Runtime bundle's parity with PyTorch and the device run;
- ``stages``: wall time per stage and what came from the cache;
- ``audio``: per prompt, every variant's ``<audio>`` player (WAV inlined) in a grid that wraps;
- ``environment``: versions.

``terminal_summary`` is the same headline and the ablation's main columns as plain text, printed at
the end of ``reproduce.py``.

Command line::

    python examples/musicgen/report.py runs/mini/results.json [--out runs/mini/report.html]

Missing parts are never invented: a figure whose data is absent is replaced by a line saying so.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the example as the package `musicgen`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from kdq._io import atomic_write_text
from kdq.errors import KdqError, bad_value

#: TinyMusician's published figures (arXiv 2509.00914) for its combined model.
PAPER = {"fad": 7.05, "clap": 0.343, "size_reduction": 0.55, "retention": 0.93}
#: The embedders the paper's FAD and CLAP are taken to use (it does not say; docs/metrics.md): result keys and names.
PAPER_EMBEDDERS = {"fad": ("vggish", "VGGish, assumed"), "clap": ("clap", "LAION CLAP")}
#: Below this many bytes of weights (fp32 student_base) a checkpoint run is toy-sized; MusicGen-small holds 2.35 GB.
TOY_BYTES = 100_000_000

#: Variant order and one-line meanings.
VARIANTS = {
    "teacher": "the larger model distilled from",
    "student_base": "the student as pretrained (MusicGen-small's analogue)",
    "student_ce": "fine-tuned with cross-entropy only (same steps and data as KD): the control",
    "student_kd": "fine-tuned with StageMixedKL against the teacher",
    "student_base_paper_plan": "student_base under the paper's precision plan (quantization only)",
    "student_kd_paper_plan": "TinyMusician: KD + T5 int8 / decoder fp16 / EnCodec fp32",
    "student_kd_kdq_plan": "KD + kdq's planned precision, no larger than the paper plan",
}

SECTIONS = ("headline", "ablation", "figures", "ort", "stages", "audio", "environment")


class ReportError(KdqError):
    """A results file the report cannot read."""


# -------------------------------------------------------------------------------------------- utils


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 10 ** -(digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    # a wide table scrolls inside its box instead of pushing the page wider than the window
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, uri: str | None, why: str = "", caption: str = "") -> str:
    if uri is None:
        return f'<div class="figure missing"><h3>{html.escape(title)}</h3><p class="skip">not drawn: {html.escape(why)}</p></div>'
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="figure"><h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" src="{uri}">{cap}</figure>'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------------------ figures


#: Training-curve panels, one per quantity: (key, title, y label).
CURVE_PANELS = (
    ("pretraining", "pretraining (teacher, student_base)", "cross-entropy on the codes (nats/token)"),
    ("student_ce", "fine-tuning: cross-entropy (the control)", "cross-entropy on the codes (nats/token)"),
    ("student_kd", "fine-tuning: distillation", "StageMixedKL loss{ce}"),
)


def _panel_of(name: str) -> str:
    return "pretraining" if "pretraining" in name else name


def curve_panels(names) -> dict[str, list[str]]:
    """``{panel: [curve names]}`` in ``CURVE_PANELS`` order; a curve of an unknown name gets its own panel."""
    known = [k for k, _, _ in CURVE_PANELS]
    keys = [k for k in known if any(_panel_of(n) == k for n in names)]
    keys += list(dict.fromkeys(_panel_of(n) for n in names if _panel_of(n) not in known))
    return {k: [n for n in names if _panel_of(n) == k] for k in keys}


def training_curves_png(curves: dict[str, list[dict]], *, ce_weight: float | None = None) -> str | None:
    """One panel per quantity (``CURVE_PANELS``; a curve of another name gets its own): the CE
    pretraining of the world's models, the CE fine-tuning control, and the distillation loss with
    StageMixedKL's temperature on a second axis. Losses of different objectives never share an axis."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    panels = curve_panels(list(curves))
    titles = {k: (t, y) for k, t, y in CURVE_PANELS}
    ce = f" + {ce_weight:g} x cross-entropy (nats)" if ce_weight else " (nats)"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, names) in zip(axes[0], panels.items()):
        title, ylabel = titles.get(key, (key, "training loss"))
        temp_ax = None
        for name in names:
            rows = curves[name]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{name} loss", lw=1.3)
            if any("temperature" in r for r in rows):
                temp_ax = temp_ax or ax.twinx()
                temp_ax.plot([r["step"] for r in rows], [r.get("temperature") for r in rows], ls="--", color="gray",
                             lw=1, label=f"{name} temperature")
                temp_ax.set_ylabel("temperature")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel.format(ce=ce))
        ax.set_yscale("log")
        lines, labels = ax.get_legend_handles_labels()
        if temp_ax is not None:
            l2, lb2 = temp_ax.get_legend_handles_labels()
            lines, labels = lines + l2, labels + lb2
        ax.legend(lines, labels, fontsize=8, loc="upper right")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(wspace=0.5)
    return _png(fig)


def pareto_png(planner: dict, variants: dict) -> str | None:
    """Bytes against predicted sensitivity: the frontier, the paper plan and kdq's plan."""
    frontier = planner.get("frontier") or []
    points = {k: planner.get(k) for k in ("fp32", "paper_plan", "kdq_plan") if isinstance(planner.get(k), dict)}
    if not frontier and not points:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    if frontier:
        fb = [p["bytes"] / 1e6 for p in frontier]
        fs = [p["sensitivity"] for p in frontier]
        ax.step(fb, fs, where="post", color="C0", lw=1.2, label="Pareto frontier (planner)")
        ax.scatter(fb, fs, s=8, color="C0")
    marks = {"fp32": ("s", "k"), "paper_plan": ("D", "C3"), "kdq_plan": ("*", "C2")}
    for key, p in points.items():
        if p.get("bytes") is None or p.get("sensitivity") is None:
            continue
        m, c = marks[key]
        ax.scatter([p["bytes"] / 1e6], [p["sensitivity"]], marker=m, color=c, s=90, zorder=5, label=key.replace("_", " "))
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel("predicted sensitivity (sum of KL, lower is better)")
    positive = [p["sensitivity"] for p in frontier if p["sensitivity"] > 0] + \
        [p["sensitivity"] for p in points.values() if (p.get("sensitivity") or 0) > 0]
    ax.set_yscale("symlog", linthresh=min(positive) if positive else 1e-6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("planner: predicted", fontsize=10)
    measured_scatter(axes[1], variants)
    fig.subplots_adjust(wspace=0.35)
    return _png(fig)


def measured_scatter(ax, variants: dict) -> list[str]:
    """Bytes against CLAP score (FAD where no variant has one) of every measured variant on ``ax``;
    a legend beside the axes names them (labels at the points overlap: variants share sizes).
    Returns the variants drawn."""
    key = "clap" if any(v.get("clap") is not None for v in variants.values()) else "fad"
    markers = "osD^v*Ph"
    drawn = []
    for i, (name, v) in enumerate(variants.items()):
        if v.get("bytes") is None or v.get(key) is None:
            continue
        ax.scatter([v["bytes"] / 1e6], [v[key]], color=f"C{i % 10}", marker=markers[i % len(markers)], s=55,
                   alpha=0.85, label=name)
        drawn.append(name)
    embedder = next((v.get(f"{key}_embedder") for v in variants.values() if v.get(f"{key}_embedder")), None)
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel(("CLAP score (higher is better)" if key == "clap" else "FAD (lower is better)")
                  + (f", {embedder}" if embedder else ""))
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.set_title("variants: measured" if drawn else "variants: no CLAP or FAD scores", fontsize=10)
    return drawn


def sensitivity_png(table: dict[str, dict[str, dict]]) -> str | None:
    """Heat map of log10 sensitivity, groups (rows) by dtypes (columns)."""
    if not table:
        return None
    import numpy as np

    plt = _plt()
    groups = list(table)
    dtypes = sorted({d for g in table.values() for d in g if d != "fp32"}, key=lambda d: ("fp32", "bf16", "fp16", "int8", "int4").index(d)
                    if d in ("fp32", "bf16", "fp16", "int8", "int4") else 99)
    grid = np.full((len(groups), len(dtypes)), np.nan)
    for i, g in enumerate(groups):
        for j, d in enumerate(dtypes):
            s = table[g].get(d, {}).get("sensitivity")
            if s is not None:
                grid[i, j] = math.log10(max(float(s), 1e-12))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(dtypes), 0.8 + 0.28 * len(groups)))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_yticks(range(len(groups)), groups, fontsize=7)
    for i in range(len(groups)):
        for j in range(len(dtypes)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] > np.nanmean(grid) else "black")
    fig.colorbar(im, ax=ax, label="log10 sensitivity (KL to fp32)")
    return _png(fig)


# ------------------------------------------------------------------------------------------ sections


def run_scale(results: dict) -> tuple[str, str]:
    """``(kind, why)``: ``"toy"``, ``"stand-in"`` or ``"real"``, from the results alone.

    Toy: the smoke preset, or checkpoints whose ``student_base`` holds under ``TOY_BYTES`` of weights.
    Stand-in: the mini world (models trained here on rendered music, not MusicGen). Real: the rest.
    """
    world = results.get("world") or {}
    fp32 = ((results.get("variants") or {}).get("student_base") or {}).get("bytes")
    if results.get("preset") == "smoke":
        return "toy", "the smoke preset: toy models trained for a few steps on a few clips"
    if world.get("source") in ("built", "hub"):
        return "stand-in", ("the mini world: a codec, text encoder, teacher and student trained here on music rendered "
                            "from MIDI, far smaller than MusicGen")
    if isinstance(fp32, (int, float)) and fp32 < TOY_BYTES:
        return "toy", f"student_base holds {_mb(fp32)} of weights; MusicGen-small holds 2,350 MB"
    return "real", ""


def banner(results: dict) -> str:
    """The warning a toy or stand-in run opens with, as plain text ("" for a run at real size)."""
    kind, why = run_scale(results)
    if kind == "toy":
        return (f"TOY SIZES ({why}). These figures show that every stage runs (the plumbing), not how good "
                "anything is; none of them compares with the paper's.")
    if kind == "stand-in":
        return (f"STAND-IN MODELS ({why}). Compare the variants with each other (same data, prompts and "
                "embedders); absolute FAD, CLAP and sizes do not compare with the paper's MusicGen figures.")
    return ""


def headline_rows(results: dict) -> list[dict[str, Any]]:
    """The headline's rows: figure, the paper's figure, kdq's (with its embedder), and whether the two
    are compared (``why`` not when: a toy or stand-in run, or another embedder than the paper's)."""
    h = results.get("headline") or {}
    kind, _ = run_scale(results)
    v = (results.get("variants") or {}).get(h.get("variant", "student_kd_paper_plan")) or {}
    emb = {k: v.get(f"{k}_embedder") for k in ("fad", "clap")}
    parts = h.get("retention_parts") or {}
    kept = ", ".join(f"{k.upper()} {_pct(x)} ({_embedder(results, emb.get(k))})" for k, x in parts.items()
                     if isinstance(x, (int, float)))
    rows = []
    for key, figure, fmt in (("fad", "FAD (lower is better)", lambda x: _fmt(x, 2)),
                             ("clap", "CLAP score (higher is better)", _fmt),
                             ("size_reduction", "size reduction against fp32", _pct),
                             ("retention", "retention", _pct)):
        paper, ours = fmt(PAPER[key]), fmt(h.get(key))
        why = "" if kind == "real" else f"{kind} run"
        if key in PAPER_EMBEDDERS:
            want, name = PAPER_EMBEDDERS[key]
            paper += f" ({name})"
            ours += f" ({_embedder(results, emb[key])})"
            if not why and emb[key] != want:
                why = f"embedder {_embedder(results, emb[key])}, not the paper's {name}"
        elif key == "retention" and kept:
            ours += f" (mean of {kept})"
        rows.append({"figure": figure, "paper": paper, "kdq": ours, "compared": not why, "why": why})
    return rows


def _embedder(results: dict, key: str | None) -> str:
    """An embedder's name as the run labelled it (``clap-mini (proxy)`` for ``clap-mini-proxy``)."""
    if key is None:
        return "embedder not recorded"
    return str((results.get("embedders") or {}).get(key, key))


def _paper_line() -> str:
    return (f"TinyMusician reports, for MusicGen-small distilled from MusicGen-large and quantized: FAD "
            f"{_fmt(PAPER['fad'], 2)} ({PAPER_EMBEDDERS['fad'][1]}), CLAP score {_fmt(PAPER['clap'])} "
            f"({PAPER_EMBEDDERS['clap'][1]}), {_pct(PAPER['size_reduction'])} smaller, {_pct(PAPER['retention'])} "
            "of the quality retained.")


def _headline(results: dict) -> str:
    h = results.get("headline") or {}
    rows = [[r["figure"], html.escape(r["paper"]) if r["compared"] else
             f'<span class="skip">not compared: {html.escape(r["why"])}</span>', html.escape(r["kdq"])]
            for r in headline_rows(results)]
    variant = html.escape(str(h.get("variant", "student_kd_paper_plan")))
    baseline = html.escape(str(h.get("baseline", "student_base")))
    definition = html.escape(str(h.get("retention_definition", "")))
    return (f'<section id="headline"><h2>TinyMusician: paper against kdq</h2><p>{html.escape(_paper_line())}</p>'
            f"<p>kdq column: variant <code>{variant}</code> against <code>{baseline}</code>. {definition}</p>"
            + _table(["figure", "paper (TinyMusician)", "kdq (this run)"], rows, "headline")
            + "<p class='note'>FAD and CLAP figures depend on the embedder, the reference set and the number of "
              "clips (docs/metrics.md): a paper figure stands beside kdq's only for a run at real size with the "
              "paper's embedder.</p></section>")


def _ablation(results: dict) -> str:
    variants = results.get("variants", {})
    fp32 = (variants.get("student_base") or {}).get("bytes")
    rows = []
    for name in [*VARIANTS, *[v for v in variants if v not in VARIANTS]]:
        v = variants.get(name)
        if v is None:
            continue
        if v.get("skipped") and v.get("bytes") is None:
            rows.append([f"<code>{name}</code>", html.escape(VARIANTS.get(name, "")),
                         f'<span class="skip">skipped: {html.escape(str(v["skipped"]))}</span>', *[""] * 9])
            continue
        size = _pct(1 - v["bytes"] / fp32) if fp32 and v.get("bytes") else "n/a"
        ret = v.get("retention") or {}
        ret_s = ", ".join(f"{k} {_pct(x)}" for k, x in ret.items() if isinstance(x, (int, float))) or "n/a"
        extra = f' <span class="skip">({html.escape(str(v["skipped"]))})</span>' if v.get("skipped") else ""
        fad_ci = v.get(f"fad_{v.get('fad_embedder')}_ci")
        clap_ci = v.get(f"clap_score_{v.get('clap_embedder')}_ci")
        rows.append([f"<code>{name}</code>", html.escape(VARIANTS.get(name, "")) + extra, _mb(v.get("bytes")), size,
                     _with_ci(v.get("fad"), fad_ci), _with_ci(v.get("fad_chroma"), v.get("fad_chroma_ci")),
                     _with_ci(v.get("clap"), clap_ci),
                     _with_ci(v.get("key_accuracy"), v.get("key_accuracy_ci")),
                     _with_ci(v.get("instrument_accuracy"), v.get("instrument_accuracy_ci")),
                     _with_ci(v.get("frame_std"), v.get("frame_std_ci")),
                     _fmt(v.get("nll")), _fmt(v.get("nll_cb0")), _fmt(v.get("kl_teacher"), 4), ret_s])
    note = html.escape(results.get("ablation_note", ""))
    ceil = results.get("ceilings") or {}
    ceil_s = "; ".join(f"{k.replace('_', ' ')} of the real test clips {_fmt(ceil[k])} (chance {_fmt(ceil.get(k + '_chance'))})"
                       for k in ("key_accuracy", "instrument_accuracy") if k in ceil)
    ceil_s += "".join(f"; {label} {_fmt(ceil[k])}" for k, label in (
        ("instrument_accuracy_reconstruction", "instrument accuracy of their codec reconstructions (what a generator can reach)"),
        ("frame_std", "frame std of the real test clips"), ("frame_std_reconstruction", "of their reconstructions"))
        if k in ceil)
    return ('<section id="ablation"><h2>Ablation</h2>'
            + _table(["variant", "what", "bytes", "smaller than student fp32", "FAD [95% interval]",
                      "FAD chroma (pitch)", "CLAP",
                      "key accuracy", "instrument accuracy", "frame std (dynamics)", "held-out NLL (nats/token)", "NLL codebook 1",
                      "KL to teacher", "retention"], rows, "ablation")
            + (f"<p class='note'>Ceilings: {html.escape(ceil_s)}.</p>" if ceil_s else "")
            + _comparisons(results)
            + (f"<p>{note}</p>" if note else "") + "</section>")


def _with_ci(value: Any, ci: Any) -> str:
    """``value [low, high]`` (a bootstrap interval) or the value alone."""
    if not isinstance(value, (int, float)) or not ci:
        return _fmt(value)
    return f"{_fmt(value)} <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>"


#: the paired comparisons' metrics shown in the report, in order (label, key in the comparison)
COMPARISON_METRICS = (("FAD mel-chroma", "fad_mel-chroma"), ("KAD mel-chroma", "kad_mel-chroma"),
                      ("FAD chroma (pitch)", "fad_chroma"), ("NLL", "nll"),
                      ("key acc.", "key_accuracy"), ("instrument acc.", "instrument_accuracy"),
                      ("CLAP proxy", "clap_clap-mini-proxy"), ("frame std", "frame_std"))


def _comparisons(results: dict) -> str:
    """The ablation's questions as paired bootstrap intervals of A - B (grey: within noise)."""
    comps = results.get("comparisons") or {}
    if not comps:
        return ""
    shown = [(label, key) for label, key in COMPARISON_METRICS if any(key in c for c in comps.values())]
    rows = []
    for name, c in comps.items():
        cells = []
        for _, key in shown:
            est = c.get(key)
            if not est:
                cells.append("")
                continue
            text = f"{est['estimate']:+.3g} <small>[{est['low']:.3g}, {est['high']:.3g}]</small>"
            cells.append(f'<span class="skip">{text} within noise</span>' if est["within_noise"] else text)
        rows.append([f"<code>{html.escape(name)}</code><br><small>{html.escape(c.get('question', ''))}</small>", *cells])
    return ("<h3>Paired comparisons (A - B, 95% bootstrap interval over prompts)</h3>"
            + _table(["A - B", *[label for label, _ in shown]], rows, "comparisons"))


def _figures(results: dict, root: Path) -> str:
    curves = {}
    for name, rel in (results.get("training", {}) or {}).items():
        if isinstance(rel, str):
            curves[name] = _read_jsonl(root / rel)
        elif isinstance(rel, list):
            curves[name] = rel
    planner = results.get("planner", {}) or {}
    ce_weight = ((results.get("config") or {}).get("distill") or {}).get("ce_weight")
    parts = [
        _figure("Training curves", training_curves_png(curves, ce_weight=ce_weight), "no training curves in results",
                "loss per optimizer step (log scale), one panel per objective: their losses are different "
                "quantities; dashed: StageMixedKL temperature"),
        _figure("Size against quality", pareto_png(planner, results.get("variants", {})),
                planner.get("skipped", "no planner data in results"),
                "left: the planner's predicted frontier with the paper plan and kdq's plan; "
                "right: measured CLAP score (FAD where there is none) of every variant"),
        _figure("Per-module sensitivity", sensitivity_png(planner.get("sensitivity") or {}),
                planner.get("skipped", "no sensitivity table in results"),
                "KL of the model's output to the fp32 model's when only that group changes dtype"),
    ]
    return '<section id="figures"><h2>Figures</h2>' + "".join(parts) + "</section>"


def _ort(results: dict) -> str:
    ort = results.get("ort") or {}
    if not ort or (ort.get("skipped") and len(ort) == 1):
        why = ort.get("skipped", "no ONNX Runtime results")
        return f'<section id="ort"><h2>ONNX Runtime and the device run</h2><p class="skip">skipped: {html.escape(str(why))}</p></section>'
    scalars = [[html.escape(k), _fmt(v)] for k, v in ort.items() if not isinstance(v, (dict, list))]
    parts = ['<section id="ort"><h2>ONNX Runtime and the device run</h2>', _table(["figure", "value"], scalars)]
    runs = ort.get("device_runs") or {}
    if runs:
        rows = []
        for label, r in runs.items():
            if r.get("skipped"):
                rows.append([html.escape(label), f'<span class="skip">skipped: {html.escape(str(r["skipped"]))}</span>',
                             "", "", "", "", "", ""])
                continue
            bb = r.get("bundle_bytes")
            total = sum(bb.values()) if isinstance(bb, dict) else bb
            rows.append([html.escape(label), html.escape(str(r.get("format", "onnx"))), _mb(total), _fmt(r.get("rtf")),
                         _fmt(r.get("tokens_per_s"), 1), _fmt(r.get("ms_per_cached_step"), 2),
                         _mb(r.get("peak_rss_bytes")), f"<code>{html.escape(str(r.get('command', '')))}</code>"])
        parts.append("<h3>Device run (fresh process per bundle)</h3>"
                     + _table(["bundle", "format", "bytes", "RTF", "tokens/s", "ms per cached step", "peak RSS",
                               "command"], rows))
    parts.append("</section>")
    return "".join(parts)


def _stages(results: dict) -> str:
    rows = []
    total = 0.0
    for name, s in (results.get("stages") or {}).items():
        wall = s.get("wall_s")
        total += wall or 0.0
        state = ("skipped: " + html.escape(str(s["skipped"]))) if s.get("skipped") else ("cached" if s.get("cached") else "ran")
        rows.append([html.escape(name), _fmt(wall, 1), state])
    rows.append(["<b>total</b>", f"<b>{total:.1f}</b>", ""])
    return '<section id="stages"><h2>Stages</h2>' + _table(["stage", "wall time (s)", "state"], rows) + "</section>"


def _wav_uri(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


#: prompts whose clips the report embeds (evenly spaced over the prompts; the rest stay on disk)
AUDIO_PROMPTS = 12


def _audio(results: dict, root: Path) -> str:
    """Per prompt, a grid of players (one per variant) that wraps to the page's width; at most
    ``AUDIO_PROMPTS`` prompts, evenly spaced, so the page stays small enough to send (150 prompts x 7
    variants embedded made a 90 MB page)."""
    prompts = results.get("prompts") or []
    variants = results.get("variants", {})
    names = [n for n in [*VARIANTS, *variants] if n in variants and variants[n].get("samples")]
    names = list(dict.fromkeys(names))
    if not prompts or not names:
        return '<section id="audio"><h2>Listen</h2><p class="skip">no samples in results</p></section>'
    n = min(AUDIO_PROMPTS, len(prompts))
    shown = sorted({round(j * (len(prompts) - 1) / max(1, n - 1)) for j in range(n)})
    note = (f"<p class='note'>{len(shown)} of {len(prompts)} prompts; every clip is on disk beside results.json "
            f"(<code>{html.escape(str(Path(variants[names[0]]['samples'][0]).parent.parent))}/</code>).</p>"
            if len(shown) < len(prompts) else "")
    blocks = []
    for i in shown:
        prompt = prompts[i]
        cells = []
        for n in names:
            samples = variants[n]["samples"]
            uri = _wav_uri(root / samples[i]) if i < len(samples) else None
            player = f'<audio controls preload="none" src="{uri}"></audio>' if uri else '<span class="skip">missing</span>'
            cells.append(f'<div class="player"><code>{html.escape(n)}</code>{player}</div>')
        blocks.append(f'<div class="prompt"><p><b>{i + 1}.</b> {html.escape(prompt)}</p>'
                      f'<div class="players">{"".join(cells)}</div></div>')
    return '<section id="audio"><h2>Listen: the same prompts across variants</h2>' + note + "".join(blocks) + "</section>"


def _environment(results: dict) -> str:
    rows = [[html.escape(k), html.escape(str(v))] for k, v in (results.get("versions") or {}).items()]
    return '<section id="environment"><h2>Environment</h2>' + _table(["package", "version"], rows) + "</section>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}h3{font-size:1em}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.6em 0;font-size:.88em}th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code{font-size:.9em;background:#f6f6f6;padding:0 .2em}.skip{color:#a33}.note{color:#555;font-size:.9em}
figure{margin:1em 0}img{max-width:100%}audio{width:100%;height:2.2em}
.banner{background:#fff3cd;border:2px solid #c90;padding:.7em 1em;font-weight:600;margin:1em 0}
.prompt{margin:.8em 0 1.2em}.prompt p{margin:.2em 0}
.players{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:.4em .8em}
.player code{display:block;font-size:.8em;margin-bottom:.1em}
"""


def render(results: dict, root: str | Path) -> str:
    """The report as one HTML string; ``root`` resolves relative paths in ``results`` (curves, WAVs)."""
    root = Path(root)
    if not isinstance(results, dict) or "variants" not in results:
        raise bad_value(ReportError, "results", type(results).__name__ if not isinstance(results, dict) else sorted(results),
                        "a dict with at least 'preset' and 'variants'", "pass reproduce.py's results.json")
    title = f"kdq: TinyMusician reproduction ({html.escape(str(results.get('preset', '?')))} preset)"
    cmd = html.escape(results.get("command", ""))
    skipped = [f"<li><code>{html.escape(k)}</code>: {html.escape(str(v['skipped']))}</li>"
               for k, v in (results.get("stages") or {}).items() if isinstance(v, dict) and v.get("skipped")]
    skipped_html = f"<p>Stages not run:</p><ul>{''.join(skipped)}</ul>" if skipped else ""

    warning = banner(results)
    body = [
        f"<h1>{title}</h1>",
        f'<p class="banner" id="banner">{html.escape(warning)}</p>' if warning else "",
        f"<p>Made by <code>{cmd}</code> on {html.escape(str(results.get('created', '')))}.</p>{skipped_html}",
        _headline(results), _ablation(results), _figures(results, root), _ort(results), _stages(results),
        _audio(results, root), _environment(results),
    ]
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def terminal_summary(results: dict) -> str:
    """The end of a run as plain text: banner, ablation (variant, bytes, FAD, CLAP, NLL, KL), the
    headline (paper | kdq) and where results.json and report.html are."""
    variants = results.get("variants") or {}
    names = [n for n in dict.fromkeys([*VARIANTS, *variants]) if n in variants]
    emb = {k: next((v.get(f"{k}_embedder") for v in variants.values() if v.get(f"{k}_embedder")), None)
           for k in ("fad", "clap")}
    rows = []
    for n in names:
        v = variants[n]
        if v.get("skipped") and v.get("bytes") is None:
            rows.append([n, f"skipped: {v['skipped']}", "", "", "", ""])
            continue
        rows.append([n, _mb(v.get("bytes")), _fmt(v.get("fad")), _fmt(v.get("clap")), _fmt(v.get("nll")),
                     _fmt(v.get("kl_teacher"), 4)])
    ablation = _text_table(["variant", "bytes", f"FAD ({_embedder(results, emb['fad'])})",
                            f"CLAP ({_embedder(results, emb['clap'])})",
                            "NLL (nats/token)", "KL to teacher"], rows)
    head = _text_table(["figure", "paper (TinyMusician)", "kdq (this run)"],
                       [[r["figure"], r["paper"] if r["compared"] else f"not compared: {r['why']}", r["kdq"]]
                        for r in headline_rows(results)])
    out = Path(str(results.get("out", ".")))
    warning = banner(results)
    parts = [*([warning] if warning else []), "ablation (test split):", ablation, "", "headline:", head, "",
             f"results: {out / 'results.json'}", f"report:  {out / 'report.html'}"]
    return "\n".join(parts)


def write_report(results_path: str | Path, out: str | Path | None = None) -> Path:
    """Read ``results.json`` and write ``report.html`` next to it (or to ``out``), atomically."""
    results_path = Path(results_path)
    if not results_path.exists():
        raise bad_value(ReportError, "results", str(results_path), "an existing results.json",
                        "run examples/musicgen/reproduce.py first")
    results = json.loads(results_path.read_text())
    page = render(results, results_path.parent)
    target = Path(out) if out else results_path.parent / "report.html"
    atomic_write_text(target, page)
    return target


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description="Render reproduce.py's results.json as a self-contained report.html.")
    p.add_argument("results", help="path to results.json")
    p.add_argument("--out", help="output HTML (default: report.html next to results.json)")
    args = p.parse_args(argv)
    path = write_report(args.results, args.out)
    print(path)
    return path


if __name__ == "__main__":
    main()
