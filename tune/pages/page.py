"""The results page of a search as one self-contained HTML string: plotly.js embedded once, nothing fetched when it
opens, every value from the record escaped. Missing optional pieces (no best trial yet, no study) are said on the page.
"""
from __future__ import annotations

import math
import numbers
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from diffmic.secrets import redact
from tune.record.results import Results
from tune.pages import looks
from tune.pages.parts import TOP_K, by_status, esc, fmt, hms, is_numeric, note, plot, with_interval
from tune.pages.selection import SELECTION_SECTIONS


# ---------------------------------------------------------------- sections
def test_looks(res: Results) -> str:
    """How often each dataset's test split was evaluated (the ledger, test-looks.csv)."""
    looks = res.test_looks
    if looks is None or looks.empty or "dataset" not in looks:
        return "none recorded"
    counts = looks["dataset"].astype(str).value_counts()
    return ", ".join(f"{d}: {counts.get(d, 0)}" for d in res.datasets) + " (test-looks.csv: every evaluation on test)"


def header(res: Results) -> str:
    s, meta = res.summary, res.meta
    counts = ", ".join(f"{n} {k.lower().replace('_', ' ')}" for k, n in s["status"].value_counts().items())
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta["started"])) if meta.get("started") else "unknown"
    def per_dataset(describe) -> str:  # one line when every dataset's search agrees, else one part per dataset
        texts = {d: describe(res.searches[d]) for d in res.datasets}
        return next(iter(texts.values())) if len(set(texts.values())) == 1 else "; ".join(
            f"{d}: {t}" for d, t in texts.items())

    facts = [("Results", res.record.uri), ("Datasets", ", ".join(res.datasets) or "none"),
             ("Selected on", per_dataset(lambda d: f"{d['metric']} ({d['mode']})")),
             ("Search", per_dataset(lambda d: f"{d['sampler']} sampler, {d['scheduler']} scheduler, "
                                              f"{d['num_samples']} trials, {d['epochs_per_trial']} epochs each")),
             ("Started", started), ("Wall time", hms(meta.get("wall_time_s"))),
             ("Trials", f"{len(s)}" + (f" ({counts})" if counts else "")),
             ("Test looks", test_looks(res)),
             *((k, f"{s[c].sum():.3g}" if c in s else "0") for k, c in (("CPU-hours", "cpu_hours"),
                                                                          ("GPU-hours", "gpu_hours")))]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    nav = " · ".join(f'<a href="#ds-{esc(d)}">{esc(d)}</a>' for d in res.datasets)
    return (f"<header><h1>DiffMIC search: {esc(res.experiment)}</h1>{live_status(res)}<table class=facts>{rows}</table>"
            f'<p>{nav} · <a href="#trials">all trials</a></p><p class=note>CPU/GPU-hours: the trials\' own compute '
            "(wall time × resources); the final test of each best trial is not counted.</p></header>")


def live_status(res: Results) -> str:
    """A running search (tune/pages/live.py): where each dataset stands, and where its study opens live."""
    if not res.live:
        return ""
    from tune.pages.parts import describe_progress

    items = "".join(f"<li><b>{esc(d)}</b>: {esc(describe_progress(p))}</li>" for d, p in res.live.items())
    studies = "".join(f"<li><code>optuna-dashboard {esc(p['study'])}</code></li>" for p in res.live.values())
    return (f"<div id=live-status class=live><p><b>This search is running</b>; the page is rewritten as trials end "
            f"(open it with <code>python tune/report.py {esc(res.record.uri)} --serve</code> to see it reload "
            f"itself).</p><ul>{items}</ul><p class=note>The studies, live (on the node that runs the search):</p>"
            f"<ul class=note>{studies}</ul></div>")


def best_section(res: Results, dataset: str) -> str:
    b = res.best.get(dataset)
    if not b and res.live:
        return "<h3>Best trial</h3>" + note("Chosen on validation, tested once and exported when the dataset's "
                                            "search ends.")
    if not b:
        statuses = ", ".join(f"{n} {k}" for k, n in res.trials(dataset)["status"].value_counts().items())
        return "<h3>Best trial</h3>" + note(f"No best trial for {dataset}: no trial reported {res.metric(dataset)} with a "
                                            f"checkpoint ({statuses or 'no trials'}).")
    val, test, rep = b.get("val", {}), b.get("test", {}), b.get("repeats") or {}
    at_point = b.get("val_at_point") or {}
    names = [k for k in dict.fromkeys([*val, *test]) if not isinstance(val.get(k, test.get(k)), (list, dict))
             and not k.endswith(("_lo", "_hi")) and not k.startswith("interval_")]

    def spread(k: str) -> str:  # mean ± sd over the finalists' repeats of the selected configuration
        mean, sd = rep.get(f"val_{k}_mean"), rep.get(f"val_{k}_sd")
        return f"<td>{esc(fmt(mean))} ± {esc(fmt(sd))}</td>" if mean is not None else "<td></td>"

    cols = 5 if rep else 4
    rows = [f"<tr><th>{esc(k)}</th><td>{esc(fmt(val.get(k)))}</td>{spread(k) if rep else ''}"
            f"<td>{esc(fmt(at_point.get(k)))}</td><td>{esc(with_interval(test, k))}{repeats_text(rep, k)}</td></tr>"
            for k in names]
    rows += [f"<tr class=sub><th colspan={cols}>parameters</th></tr>"]
    rows += [f"<tr><th>{esc(k)}</th><td colspan={cols - 1}>{esc(fmt(v))}</td></tr>"
             for k, v in {**b.get("params", {}), **(b.get("sampling") or {}), **(b.get("point") or {})}.items()]
    rows += [f"<tr><th>{k}</th><td colspan={cols - 1} class=uri>{esc(b[k])}</td></tr>"
             for k in ("checkpoint_uri", "bundle_uri") if b.get(k)]
    head = "<th>val (mean ± sd over repeats)</th>" if rep else ""
    level = test.get("interval_level")
    testhead = f"test [{level:.0%} bootstrap interval]" if level else "test"
    left = (f"<p>Trial <b>{esc(b.get('trial_id', '?'))}</b>, chosen on validation {esc(res.metric(dataset))} ({esc(res.searches[dataset]['mode'])}), tested once.</p>"
            f"<table class=small><tr class=sub><th>metric</th><th>val (best epoch, training sampler)</th>{head}<th>val (exported point)</th><th>{esc(testhead)}</th></tr>{''.join(rows)}</table>")
    return f"<h3>Best trial</h3><div class=grid2><div>{left}</div><div>{confusion(b)}</div></div>"


def repeats_text(rep: dict, key: str) -> str:
    """The configuration's test mean ± sd over its finalist repeats, beside the exported repeat's test figure."""
    mean, sd = rep.get(f"test_{key}_repeats_mean"), rep.get(f"test_{key}_repeats_sd")
    return "" if mean is None else f"<br><small>repeats {esc(fmt(mean))} ± {esc(fmt(sd))}</small>"


def confusion(best: dict) -> str:
    cm = best.get("test", {}).get("confusion_matrix")
    if not cm:
        return note("No test confusion matrix (best.json is missing or has none).")
    names = [str(c) for c in best.get("class_names") or range(len(cm))]
    fig = go.Figure(go.Heatmap(z=cm, x=names, y=names, colorscale="Blues", texttemplate="%{z}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title="Test confusion matrix", xaxis_title="predicted", yaxis_title="true",
                      yaxis_autorange="reversed", xaxis_type="category", yaxis_type="category")
    test = best["test"]
    lo, hi = test.get("per_class_recall_lo") or [], test.get("per_class_recall_hi") or []
    recall = " · ".join(f"{n} {float(r):.3f}" + (f" [{lo[i]:.3f}, {hi[i]:.3f}]" if i < len(lo) and i < len(hi) else "")
                        for i, (n, r) in enumerate(zip(names, test.get("per_class_recall") or [])))
    return plot(fig, 340 + 12 * len(names)) + (note(f"Per-class test recall: {recall}") if recall else "")


def params_section(res: Results, dataset: str) -> str:
    metric, minimize, params = res.metric(dataset), res.minimize(dataset), res.params(dataset)
    trials, title = res.ranked(dataset), f"<h3>{esc(metric)} vs each searched parameter</h3>"
    if trials.empty or not params:
        return title + note(f"No trial reported {metric}." if trials.empty else "No searched parameter found.")
    cols = min(len(params), 4)
    rows = math.ceil(len(params) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[k for k, _, _ in params], shared_yaxes=True)
    for i, (key, kind, values) in enumerate(params):
        where = dict(row=i // cols + 1, col=i % cols + 1)
        categorical = kind == "choice" or not is_numeric(trials[key])
        x = trials[key].astype(str) if categorical else trials[key]
        if categorical:  # the spread per value in grey; the points on top carry the status colour
            fig.add_trace(go.Box(x=x, y=trials[metric], showlegend=False, boxpoints=False, hoverinfo="skip",
                                 marker_color="#adb5bd", line_width=1), **where)
            fig.update_xaxes(type="category", categoryorder="array", **where,
                             categoryarray=[str(v) for v in values] or sorted(x.unique()))
        elif kind == "loguniform":
            fig.update_xaxes(type="log", **where)
        for trace in by_status(trials, go.Scatter, x=x, y=trials[metric], text=trials["trial_id"], mode="markers",
                               marker_size=9, showlegend=i == 0, hovertemplate="%{text}<br>%{x}: %{y:.4g}"):
            fig.add_trace(trace, **where)
    fig.update_yaxes(title_text=metric, col=1)
    skipped = len(res.trials(dataset)) - len(trials)
    return title + plot(fig, 320 * rows) + (note(f"{skipped} trial(s) without {metric} (errors, no result) are "
                                                 "not shown.") if skipped else "")


def parallel_section(res: Results, dataset: str) -> str:
    metric, minimize, params = res.metric(dataset), res.minimize(dataset), res.params(dataset)
    trials, title = res.ranked(dataset), "<h3>Parallel coordinates (trials that reported the metric)</h3>"
    if trials.empty or not params:
        return title + note(f"No trial reported {metric}.")
    dims = []
    for key, kind, values in params:
        col = trials[key]
        if kind == "choice" or not is_numeric(col):  # categories as evenly spaced ticks, in the space's order
            order = list(dict.fromkeys([str(v) for v in values] + sorted(col.astype(str).unique())))
            dims.append(dict(label=key, values=col.astype(str).map(order.index), tickvals=list(range(len(order))),
                             ticktext=order))
        elif kind == "loguniform":  # parcoords has no log axis
            dims.append(dict(label=f"log10 {key}", values=np.log10(col.astype(float).where(col > 0))))
        else:
            dims.append(dict(label=key, values=col))
    dims.append(dict(label=metric, values=trials[metric]))
    fig = go.Figure(go.Parcoords(dimensions=dims, line=dict(color=trials[metric], colorscale="Viridis",
                                                            showscale=True, reversescale=minimize)))
    fig.update_layout(margin=dict(l=80, r=80, t=60, b=30))
    return title + plot(fig, 400)


def curves_section(res: Results, dataset: str) -> str:
    metric, minimize, params = res.metric(dataset), res.minimize(dataset), res.params(dataset)
    top, h = res.ranked(dataset).head(TOP_K), res.history
    title = f"<h3>Learning curves: validation {esc(metric)} per epoch, top {TOP_K} trials</h3>"
    if top.empty or h.empty or metric not in h:
        return title + note("No per-epoch history for this dataset.")
    fig = go.Figure()
    for _, t in top.iterrows():
        run = h[(h["dataset"].astype(str) == dataset) & (h["trial_id"] == t["trial_id"])].sort_values("epoch")
        fig.add_trace(go.Scatter(x=run["epoch"], y=run[metric], mode="lines+markers",
                                 name=f"{t['trial_id']} ({t[metric]:.3f}, {t['status'].lower()})"))
    fig.update_layout(xaxis_title="epoch", yaxis_title=metric, xaxis_dtick=1)
    return title + plot(fig)


def sampling_section(res: Results, dataset: str) -> str:
    metric, params = res.metric(dataset), res.params(dataset)
    key, title, trials = "diffusion.sample_steps", "<h3>Accuracy vs sampling steps and cost</h3>", res.ranked(dataset)
    if key not in [p[0] for p in params]:
        return title + note(f"{key} was not searched in this experiment; add it to search.space to compare accuracy "
                            "with the number of reverse-diffusion sampling steps.")
    acc = "val_accuracy" if "val_accuracy" in trials else metric
    if trials.empty or acc not in trials:
        return title + note(f"No trial reported {acc}.")
    per_epoch = trials["wall_time_s"] / trials["epochs_run"].where(trials["epochs_run"] > 0)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=["sampling steps", "mean epoch time (train + sampled validation), s"])
    for i, x in enumerate((trials[key], per_epoch)):
        fig.add_trace(go.Scatter(x=x, y=trials[acc], mode="markers", showlegend=False, text=trials["trial_id"],
                                 marker=dict(size=9, color=trials[key], colorscale="Plasma", showscale=i == 1,
                                             colorbar=dict(title="steps")),
                                 hovertemplate="%{text}<br>%{x:.4g}: %{y:.4g}<extra></extra>"), row=1, col=i + 1)
    fig.update_yaxes(title_text=acc, col=1)
    return title + plot(fig)


def importance_section(res: Results, dataset: str) -> str:
    metric = res.metric(dataset)
    title = f"<h3>Parameter importances for {esc(metric)} (Optuna's fANOVA evaluator)</h3>"
    rel = res.record.study_key(dataset)
    try:
        if not res.storage.exists(rel):
            return title + note(f"No Optuna study stored at {rel} (an external search.optuna_storage, or the search "
                                "did not finish).")
        importances, n = optuna_importances(res, dataset, rel)
    except Exception as e:  # a broken or foreign study must not cost the rest of the page
        return title + note(f"Could not compute importances: {type(e).__name__}: {e}")
    if importances is None:
        return title + note(f"Importances need at least 2 completed trials in the study; it has {n}.")
    keys = list(importances)[::-1]  # plotly draws the first bar at the bottom
    fig = go.Figure(go.Bar(x=[importances[k] for k in keys], y=keys, orientation="h", marker_color="#457b9d"))
    fig.update_layout(xaxis_title=f"importance (share of the objective's variance, {n} completed trials)")
    where = res.storage.join(rel)
    hint = (f"optuna-dashboard sqlite:///{where}" if not res.storage.is_s3 else
            f"optuna-dashboard sqlite:///{dataset}.db after downloading {where}")
    return title + plot(fig, 120 + 40 * len(keys)) + note(f"To explore the study interactively: {hint}")


def optuna_importances(res: Results, dataset: str, rel: str) -> tuple[dict | None, int]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:  # SQLite needs a local file; the stored one stays untouched
        url = f"sqlite:///{res.storage.download_file(rel, Path(tmp) / 'study.db')}"
        names, name = optuna.study.get_all_study_names(url), f"{res.experiment}-{dataset}"
        study = optuna.load_study(study_name=names[0] if len(names) == 1 else name, storage=url)
        n = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        if n < 2:
            return None, n
        return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))), n  # seeded: stable


def asha_section(res: Results, dataset: str) -> str:
    search = res.searches[dataset]
    trials, title = res.trials(dataset), "<h3>Early stopping (ASHA)</h3>"
    if search["scheduler"] == "none":
        return title + note("search.scheduler=none: every trial ran all its epochs.")
    epochs = search.get("epochs_per_trial") or (trials["epochs_run"].max() if len(trials) else 0)
    stopped = trials[trials["status"] == "STOPPED_EARLY"]
    epoch_s = trials["wall_time_s"] / trials["epochs_run"].where(trials["epochs_run"] > 0)
    saved = float(((epochs - stopped["epochs_run"]).clip(lower=0) * epoch_s[stopped.index]).sum()) / 3600
    spent = float(trials["wall_time_s"].fillna(0).sum()) / 3600
    gpus = (trials["gpu_hours"] * 3600 / trials["wall_time_s"]).median() if len(trials) else math.nan
    gpu_text = f" ≈ {saved * gpus:.3g} GPU-hours," if math.isfinite(gpus) and gpus > 0 else ","
    share = 100 * saved / (spent + saved) if spent + saved > 0 else 0.0
    text = (f"ASHA stopped {len(stopped)} of {len(trials)} trials before their {epochs} epochs. Estimated compute "
            f"saved (for each stopped trial: epochs not run × its mean epoch time): {saved:.3g} trial-hours{gpu_text} "
            f"{share:.1f}% of what the search would have used without early stopping (it used {spent:.3g} "
            "trial-hours).")
    fig = go.Figure(by_status(trials, go.Bar, x=trials["trial_id"], y=trials["epochs_run"]))
    fig.add_hline(y=epochs, line_dash="dash", annotation_text="epochs per trial")
    fig.update_layout(xaxis_title="trial", yaxis_title="epochs run", xaxis_type="category")
    return title + f"<p>{esc(text)}</p>" + plot(fig, 300)


def trial_table(res: Results) -> str:
    """Every trial of every dataset; each dataset's trials best first on its own selection rule."""
    s = res.summary
    searched = [key for d in res.datasets for key, _, _ in res.params(d)]
    cols = ["dataset", "trial_id", "status", *searched, *[res.metric(d) for d in res.datasets],
            *[c for c in s if c[:4] == "val_"], "best_epoch", "epochs_run", "wall_time_s", "cpu_hours", "gpu_hours"]
    cols = [c for c in dict.fromkeys(cols) if c in s]
    best_ids = {(d, str(b.get("trial_id"))) for d, b in res.best.items()}
    parts = []
    for d in res.datasets:
        ranked = res.ranked(d)
        parts += [ranked, res.trials(d).drop(index=ranked.index)]  # then the trials without the metric
    ordered = pd.concat([s.iloc[0:0], *parts])
    body = []
    for _, row in ordered.iterrows():
        cells = []
        for c in cols:
            v, shown = row[c], fmt(row[c])
            key = repr(float(v)) if shown not in ("", "yes", "no") and isinstance(v, numbers.Real) else str(v)
            status = f' class="s-{esc(v)}"' if c == "status" else ""  # every attribute quoted, every value escaped
            cells.append(f'<td data-v="{esc(key if shown else "")}"{status}>{esc(shown)}</td>')  # data-v: sort key
        best = " class=best" if (str(row["dataset"]), row["trial_id"]) in best_ids else ""
        body.append(f"<tr{best}>{''.join(cells)}</tr>")
    head = "".join(f"<th title='click to sort'{'' if is_numeric(s[c]) else ' data-t=text'}>{esc(c)}</th>" for c in cols)
    return (f"<section id=trials><h2>All trials ({len(s)})</h2><p class=note>Click a column header to sort; the best "
            "trial of each dataset is highlighted. Metrics are at each trial's best epoch.</p><div class=scroll>"
            f"<table class=sortable id=trial-table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            "</table></div></section>")


# ---------------------------------------------------------------- the page
CSS = """.live{background:#eef5fb;border-left:4px solid #457b9d;padding:4px 14px;margin:8px 0}body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 24px 48px;color:#222}
h1{margin:20px 0 8px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:40px}h3{margin:28px 0 6px}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;font-size:14px}
table.facts th{color:#555}tr.sub th{background:#f4f4f4}.small td{font-variant-numeric:tabular-nums}
.uri{font-family:monospace;font-size:12px;word-break:break-all}.note{color:#666;font-size:13px}
.grid2{display:grid;grid-template-columns:minmax(320px,1fr) 1.2fr;gap:24px;align-items:start}.scroll{overflow-x:auto}
table.sortable th{cursor:pointer;background:#f4f4f4;position:sticky;top:0;white-space:nowrap}
table.sortable th[data-dir=asc]::after{content:" \\25B2"}table.sortable th[data-dir=desc]::after{content:" \\25BC"}
table.sortable td{font-variant-numeric:tabular-nums;white-space:nowrap}tr.best td{background:#fff7d6}
.s-COMPLETED{color:#2a9d8f}.s-STOPPED_EARLY{color:#d9822b}.s-ERROR{color:#e63946}.s-NO_RESULT{color:#8d99ae}"""

# Sort on click: numeric columns by value, text columns (data-t=text: trial ids like "1e5a0b3c") as text; empty cells
# stay last in both directions.
SORT_JS = """document.querySelectorAll('table.sortable').forEach(function(table){
 table.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.dataset.dir!=='asc', text=th.dataset.t==='text', body=table.tBodies[0];
  table.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;}); th.dataset.dir=asc?'asc':'desc';
  function key(r){var v=r.cells[i].dataset.v; return v===''?null:(text||isNaN(Number(v))?v:Number(v));}
  Array.from(body.rows).sort(function(a,b){var x=key(a),y=key(b);
   if(x===null||y===null) return (x===null)-(y===null);
   var c=(typeof x===typeof y)?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1); return asc?c:-c;
  }).forEach(function(r){body.appendChild(r);});
 });});});"""

SECTIONS = (best_section, params_section, parallel_section, curves_section, sampling_section, importance_section,
            asha_section)


def dataset_section(res: Results, dataset: str) -> str:
    trials = res.trials(dataset)
    parts = [f'<section id="ds-{esc(dataset)}"><h2>Dataset: {esc(dataset)} ({len(trials)} trials)</h2>']
    if len(trials) and (trials["status"] == "ERROR").all():
        parts.append(note("Every trial of this dataset failed (status ERROR): see the Ray Tune logs."))
    sections = (SECTIONS[0], *SELECTION_SECTIONS, *SECTIONS[1:])
    return "".join(parts + [section(res, dataset) for section in sections]) + "</section>"


def render(res: Results) -> str:
    """The page: plotly.js inline once, then each section; AWS secrets of this environment redacted."""
    body = (header(res) + "".join(dataset_section(res, d) for d in res.datasets)
            + looks.where_it_looks_section(res) + trial_table(res))
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>DiffMIC search {esc(res.experiment)}"
            f"</title><meta name=viewport content='width=device-width,initial-scale=1'>"
            # a running search's page reloads itself now and then wherever it is opened (file, S3 console, --serve)
            f"{'<meta http-equiv=refresh content=60>' if res.live else ''}<style>{CSS}{looks.CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>{body}<footer class=note>'
            f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by tune/report.py.</footer>"
            f"<script>{SORT_JS}</script></body></html>")
    return redact(page)  # belt and braces: no AWS secret of this environment can reach the page
