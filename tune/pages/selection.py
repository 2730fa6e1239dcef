"""The report's sections on how the exported model was selected: the diffusion head against its own DCG and the
plain control (the gain), the Pareto front of validation metric against prediction cost (pareto.csv) and the
finalists' repeats (finalists.csv)."""
from __future__ import annotations

import plotly.graph_objects as go

from diffmic.metrics import HEAD_METRICS
from tune.selection.points import COST
from tune.record.results import Results
from tune.pages.parts import TOP_K, esc, fmt, note, plot
from diffmic.selection import ranked


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
            "<p class=note>Selected on the mean; only the selected configuration's repeat 0 (fixed in advance, not its best "
            "one) is tested.</p>")


def gain_section(res: Results, dataset: str) -> str:
    """Head, its DCG and the plain control side by side on test (the exported model's trial), the gain = head − DCG,
    and the gain against epochs for the top trials: whether the diffusion head pays its way."""

    title = "<h3>The diffusion gain: head against its own DCG and a plain classifier</h3>"
    b = res.best.get(dataset) or {}
    test, control, kind = b.get("test") or {}, b.get("control") or {}, b.get("model_kind", "diffmic")
    parts = [title]
    if b.get("verdict"):  # the search's own sentence when a control won (tune/selection/controls.py)
        parts.append(f"<p class=warn><b>{esc(b['verdict'])}.</b></p>")
    if test:
        head = "head (exported point)" if kind == "diffmic" else f"exported {kind}"
        rows = [f"<tr><th>{esc(m)}</th><td>{esc(fmt(test.get(m)))}</td><td>{esc(fmt(test.get(f'dcg_{m}')))}</td>"
                f"<td>{esc(fmt(test.get(f'gain_{m}')))}</td><td>{esc(fmt(control.get(f'control_test_{m}')))}</td>"
                "</tr>" for m in HEAD_METRICS]
        parts.append(f"<table class=small><tr class=sub><th>test</th><th>{esc(head)}</th><th>its DCG</th>"
                     f"<th>gain (head − DCG)</th><th>plain control</th></tr>{''.join(rows)}</table>")
        if control.get("control_wall_time_s") is not None:
            parts.append(note(f"The control trained in {fmt(control['control_wall_time_s'])} s (wall)."))
    metric = res.metric(dataset)
    gain = "val_gain_" + metric.removeprefix("val_")
    h, top = res.history, res.ranked(dataset).head(TOP_K)
    if not h.empty and gain in h and not top.empty:
        fig = go.Figure()
        for _, t in top.iterrows():
            run = h[(h["dataset"].astype(str) == dataset) & (h["trial_id"] == t["trial_id"])].sort_values("epoch")
            fig.add_trace(go.Scatter(x=run["epoch"], y=run[gain], mode="lines+markers", name=str(t["trial_id"])))
        fig.add_hline(y=0, line_dash="dot")
        fig.update_layout(xaxis_title="epoch", yaxis_title=f"{gain} (head − DCG)", xaxis_dtick=1)
        parts.append(plot(fig, 300))
    else:
        parts.append(note("No per-epoch gain in the history (trials from before the gain was recorded)."))
    return "".join(parts)


def calibration_section(res: Results, dataset: str) -> str:
    """The exported model's reliability diagram on test (confidence against accuracy per bin, the diagonal being
    perfect calibration) beside its calibration figures and its DCG's, each with its own temperature."""
    b = res.best.get(dataset) or {}
    test = b.get("test") or {}
    diagram = test.get("reliability") or {}
    title = "<h3>Calibration of the exported model (test)</h3>"
    if not diagram.get("count"):
        return title + note("No reliability data for this dataset's test (best.json from an earlier version).")
    tau = (b.get("val_at_point") or {}).get("temperature")
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dot", color="#999")),
        go.Scatter(x=diagram["confidence"], y=diagram["accuracy"], mode="lines+markers", name="exported model",
                   text=[f"{n} images" for n in diagram["count"]],
                   marker=dict(size=[6 + 24 * (n / max(diagram["count"])) ** 0.5 for n in diagram["count"]]),
                   hovertemplate="confidence %{x:.3f}: accuracy %{y:.3f} (%{text})<extra></extra>")])
    fig.update_layout(xaxis_title="mean confidence in the bin", yaxis_title="accuracy in the bin",
                      xaxis_range=[0, 1], yaxis_range=[0, 1])
    names = ("ece", "classwise_ece", "nll", "brier")
    rows = "".join(f"<tr><th>{esc(m)}</th><td>{esc(fmt(test.get(m)))}</td><td>{esc(fmt(test.get(f'dcg_{m}')))}</td>"
                   "</tr>" for m in names)
    table = (f"<table class=small><tr class=sub><th>test</th><th>model</th><th>its DCG</th></tr>{rows}</table>"
             + note(f"Temperature fitted on validation at the exported point: {fmt(tau)} (the DCG has its own)."))
    return title + f"<div class=grid2><div>{plot(fig, 340)}</div><div>{table}</div></div>"


def models_section(res: Results, dataset: str) -> str:
    """DiffMIC against DiffMIC-v2, when the search held both (a `model.kind` parameter): per model, its trials, the
    best and the mean validation figure of the head and of its DCG, and the gain."""
    trials = res.trials(dataset)
    if "model.kind" not in trials or trials["model.kind"].nunique() < 2:
        return ""
    metric = res.metric(dataset)
    dcg, gain = metric.replace("val_", "val_dcg_"), metric.replace("val_", "val_gain_")
    rows = []
    for kind, group in trials.groupby("model.kind", sort=True):
        done = group[group[metric].notna()] if metric in group else group.iloc[0:0]
        best = done.iloc[ranked(done.to_dict("records"), metric, res.searches[dataset]["mode"])[0]] if len(done) else None
        cells = [kind, len(group), fmt(None if best is None else best[metric]), fmt(done[metric].mean()),
                 fmt(done[dcg].mean() if dcg in done else None), fmt(done[gain].mean() if gain in done else None)]
        rows.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    head = ["model", "trials", f"best {metric}", "mean", "its DCG, mean", "gain, mean"]
    return (f"<h3>DiffMIC against DiffMIC-v2</h3><table class=small><tr class=sub>"
            f"{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>"
            "<p class=note>Both models searched in one study (<code>model.kind</code>): validation figures at each "
            "trial's best epoch, with its own sampler.</p>")


SELECTION_SECTIONS = (gain_section, models_section, calibration_section, pareto_section, finalists_section)
