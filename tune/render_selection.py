"""The report's sections on how the exported model was selected: the Pareto front of validation metric against
prediction cost (pareto.csv) and the finalists' repeats (finalists.csv)."""
from __future__ import annotations

import plotly.graph_objects as go

from tune.pareto import COST
from tune.record import Results
from tune.render import esc, fmt, note, plot


def pareto_section(res: Results, dataset: str) -> str:
    title, metric = "<h3>Validation metric against prediction cost</h3>", res.metric(dataset)
    points = res.pareto[res.pareto["dataset"].astype(str) == dataset] if "dataset" in res.pareto else res.pareto
    if points.empty or metric not in points:
        return title + note("No sampler points were measured (search.pareto=[] or no checkpointed trial).")
    label = points["sampler"].astype(str) + " " + points["sample_steps"].astype(str) + " steps, S=" + \
        points["num_samples"].astype(str) + " · trial " + points["trial_id"].astype(str)
    front = points[points["on_front"].astype(bool)].sort_values(COST)
    fig = go.Figure([
        go.Scatter(x=points[COST], y=points[metric], mode="markers", name="trial × sampler point", text=label,
                   marker=dict(size=8, color="#9aa5b1"), hovertemplate="%{text}<br>%{x:.3g} ms: %{y:.4g}<extra></extra>"),
        go.Scatter(x=front[COST], y=front[metric], mode="lines+markers", name="Pareto front", text=label[front.index],
                   line=dict(shape="hv"), marker=dict(size=10, color="#d62728"),
                   hovertemplate="%{text}<br>%{x:.3g} ms: %{y:.4g}<extra></extra>")])
    fig.update_xaxes(title_text="prediction cost, ms per image (validation, trial's device)", type="log")
    fig.update_yaxes(title_text=metric)
    cols = ["trial_id", "sampler", "sample_steps", "num_samples", metric, COST, "denoiser_calls_per_image"]
    rows = "".join("<tr>" + "".join(f"<td>{esc(fmt(r[c]))}</td>" for c in cols) + "</tr>"
                   for _, r in front.iterrows())
    table = (f"<table class=small><tr class=sub>{''.join(f'<th>{esc(c)}</th>' for c in cols)}</tr>{rows}</table>"
             "<p class=note>The front: points no other point beats on both. Any point can be exported: "
             "<code>python -m tune.export EXPERIMENT --dataset D --trial ID --sampler ddim --steps 10</code>.</p>")
    return title + plot(fig) + table


def finalists_section(res: Results, dataset: str) -> str:
    runs = res.finalists[res.finalists["dataset"].astype(str) == dataset] if "dataset" in res.finalists \
        else res.finalists
    if runs.empty:
        return ""
    metric, keys = res.metric(dataset), [k for k, _, _ in res.params(dataset)]
    rows = []
    for _, group in runs.groupby("config", sort=True):
        values = group[metric].astype(float)
        sd = values.std(ddof=1) if values.notna().sum() > 1 else float("nan")
        params = ", ".join(f"{k}={fmt(group.iloc[0][k])}" for k in keys if k in group)
        each = " ".join(fmt(v) for v in values)
        rows.append(f"<tr><td>{esc(params)}</td><td>{len(group)}</td><td>{esc(each)}</td>"
                    f"<td>{esc(fmt(values.mean()))} ± {esc(fmt(sd))}</td></tr>")
    return (f"<h3>Finalists over seeds</h3><table class=small><tr class=sub><th>configuration</th><th>repeats</th>"
            f"<th>{esc(metric)} of each</th><th>mean ± sd</th></tr>{''.join(rows)}</table>"
            "<p class=note>Selected on the mean; only the selected configuration's best repeat is tested.</p>")


SELECTION_SECTIONS = (pareto_section, finalists_section)
