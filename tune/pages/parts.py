"""The pieces every section of the report is made of: escaped text, number formats, notes, plotly figures drawn
from inlined JSON, status colours. The report's modules (render, render_selection, render_looks) and the live
progress line import them from here, and nothing here imports them back."""
from __future__ import annotations

import html
import itertools
import json
import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go

STATUS_COLOURS = {"COMPLETED": "#2a9d8f", "STOPPED_EARLY": "#f4a261", "ERROR": "#e63946", "NO_RESULT": "#8d99ae",
                  "RUNNING": "#457b9d", "PENDING": "#ced4da"}  # the last two on a running search's page
TOP_K = 5


# ---------------------------------------------------------------- html helpers
def esc(value) -> str:
    """Escaped text; a URL's user:password@ part (should anyone put one in a URI) is masked."""
    return html.escape(re.sub(r"(\w://)[^/@\s]+@", r"\1***@", str(value)))


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    return f"{float(value):.4g}" if isinstance(value, (float, np.floating)) else str(value)


def hms(seconds) -> str:
    if seconds is None or not math.isfinite(float(seconds)):
        return "unknown"
    s = int(round(float(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def note(text: str) -> str:
    return f"<p class=note>{esc(text)}</p>"


_PLOT_IDS = itertools.count()
_CONFIG = json.dumps({"displaylogo": False, "responsive": True})


def plot(fig: go.Figure, height: int = 360) -> str:
    """A figure as a div and the call that draws it (plotly.js itself is embedded once, in the page head).

    The figure goes in as JSON with <, > and & written as \\u escapes: a value from the record (a class name, a
    trial id) can then never close the script or open a tag, and plotly still shows it as the text it is."""
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=60, r=20, t=40, b=50))
    spec = fig.to_json().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    div = f"plot-{next(_PLOT_IDS)}"
    return (f'<div id="{div}" class="plotly-graph-div" style="height:{height}px;width:100%"></div><script>'
            f'(function(){{var f={spec};Plotly.newPlot("{div}",f.data,f.layout,{_CONFIG});}})();</script>')


def by_status(trials: pd.DataFrame, trace, **kw) -> list:
    """One trace per status present (colour = status, named in the legend); kw values that are Series are masked."""
    statuses = dict.fromkeys([*STATUS_COLOURS, *trials["status"]])  # a status of some other writer: grey
    return [trace(name=s, legendgroup=s, marker_color=STATUS_COLOURS.get(s, "#6c757d"),
                  **{k: v[m] if isinstance(v, pd.Series) else v for k, v in kw.items()})
            for s in statuses if (m := trials["status"] == s).any()]


def with_interval(metrics: dict, key: str) -> str:
    """A test figure with its bootstrap interval when it has one: 0.853 [0.795, 0.904]."""
    lo, hi = metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")
    return fmt(metrics.get(key)) + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else "")


def describe_progress(p: dict) -> str:
    """`running: 3 of 8 trials finished (1 stopped early), 2 running, 3 pending; best val_macro_f1 0.912 (trial
    ab12); ETA 0:05:12`, or the dataset's phase once its trials have ended."""
    done = f"{p['finished']} of {p['total']} trials finished"
    extra = [f"{p['stopped']} stopped early"] * bool(p["stopped"]) + [f"{p['errors']} failed"] * bool(p["errors"])
    done += f" ({', '.join(extra)})" if extra else ""
    best = f"; best {p['metric']} {fmt(p['best'])} (trial {p['best_trial']})" if p["best"] is not None else ""
    if p["phase"] != "searching":
        return f"{p['phase']}: {done}{best}"
    eta = hms(p["eta_s"]) if math.isfinite(p["eta_s"]) else "unknown until a trial ends"
    return f"running: {done}, {p['running']} running, {p['pending']} pending{best}; ETA {eta}"
