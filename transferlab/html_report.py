"""``reports/index.html``: one self-contained page (images inlined, no CDN) that answers
"which adaptation should I ship, and how easily is it fooled?".

It reads only the files the stages wrote, and renders every section even when a stage has not
run yet, saying so, so the page never breaks on a partial workspace.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from transferlab.atomic import atomic_write

SECTIONS = (
    ("ship", "What to ship"),
    ("data", "Data"),
    ("ladder", "Transfer ladder"),
    ("robustness", "Robustness curves"),
    ("examples", "Adversarial examples"),
    ("transfer", "Transfer matrix"),
    ("learning-curve", "Learning curve"),
    ("sanity", "Sanity flags"),
    ("lineage", "Lineage"),
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7fb}header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c9cfdd}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #e3e6ee}
nav a{margin-right:16px;color:#3451b2;text-decoration:none;font-size:14px}
main{padding:8px 32px 40px;max-width:1200px}section{background:#fff;border:1px solid #e3e6ee;
border-radius:8px;padding:16px 20px;margin:16px 0}h2{margin-top:0;font-size:18px}
table{border-collapse:collapse;font-size:14px}td,th{border-bottom:1px solid #e3e6ee;
padding:6px 12px;text-align:left}th{background:#f0f2f8}td.num{text-align:right;
font-variant-numeric:tabular-nums}.muted{color:#6b7385}.thumbs{display:flex;flex-wrap:wrap;gap:6px}
.thumbs img{width:72px;height:72px;object-fit:cover;border-radius:4px;border:1px solid #e3e6ee}
.cls{margin:8px 0 14px}.plot{max-width:100%;border:1px solid #e3e6ee;border-radius:6px}
.flag-fail{color:#b3261e;font-weight:600}.flag-note{color:#8a6100}.ok{color:#1e7b34;font-weight:600}
code{background:#f0f2f8;padding:1px 4px;border-radius:3px}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _thumb_data_uri(path: Path, size: int = 96) -> str | None:
    try:
        with Image.open(path) as im:
            im.thumbnail((size, size))
            rgb = Image.new("RGB", im.size, (255, 255, 255))
            rgb.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else _esc(value)


def _img(path: Path, alt: str) -> str:
    return f'<img class="plot" src="{_png_data_uri(path)}" alt="{_esc(alt)}">'


def _missing(what: str, how: str) -> str:
    return f'<p class="muted">{_esc(what)} Run <code>{_esc(how)}</code> to produce it.</p>'


# ------------------------------------------------------------------ sections


def _data_section(root: Path, thumbs_per_class: int) -> str:
    split_rows = _read_csv(root / "data/split.csv")
    manifest = _read_csv(root / "data/manifest.csv")
    if not manifest:
        return _missing("No dataset has been pulled yet.", "transferlab pull")
    counts: dict[str, Counter] = {}
    for r in split_rows:
        counts.setdefault(r["label"], Counter())[r["split"]] += 1
    classes = sorted({r["label"] for r in manifest})
    rows = "".join(
        f"<tr><td>{_esc(c)}</td>"
        + "".join(
            f'<td class="num">{counts.get(c, Counter())[s]}</td>' for s in ("train", "val", "test")
        )
        + f'<td class="num">{sum(1 for r in manifest if r["label"] == c)}</td></tr>'
        for c in classes
    )
    table = (
        "<table><tr><th>class</th><th>train</th><th>val</th><th>test</th><th>total</th></tr>"
        f"{rows}</table>"
    )
    rejected = _read_json(root / "data/rejected.json") or []
    if rejected:
        reasons = Counter(str(r.get("reason", "")).split(":")[0] for r in rejected)
        rej = "".join(
            f"<tr><td>{_esc(r.get('source', ''))}</td><td>{_esc(r.get('reason', ''))}</td></tr>"
            for r in rejected[:50]
        )
        summary = ", ".join(f"{n} {_esc(k)}" for k, n in reasons.most_common())
        rej_html = (
            f"<h3>Rejected files ({len(rejected)}: {summary})</h3>"
            f"<table><tr><th>file</th><th>reason</th></tr>{rej}</table>"
        )
    else:
        rej_html = "<p class='ok'>No file was rejected.</p>"
    grids = []
    for c in classes:
        imgs = []
        for r in [r for r in manifest if r["label"] == c][:thumbs_per_class]:
            uri = _thumb_data_uri(root / "data" / r["path"])
            if uri:
                imgs.append(f'<img src="{uri}" alt="{_esc(c)}: {_esc(r["path"])}">')
        grids.append(
            f'<div class="cls"><b>{_esc(c)}</b><div class="thumbs">{"".join(imgs)}</div></div>'
        )
    return f"{table}{rej_html}<h3>Samples per class</h3>{''.join(grids)}"


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return ""
    return f' <span class="muted">[{low:.3f}, {high:.3f}]</span>'


def _acc(entry: dict | None) -> str:
    """``0.733 [0.590, 0.840]`` from {"acc", "ci"}; "–" when not measured."""
    if not entry or entry.get("acc") is None:
        return "–"
    ci = entry.get("ci") or [None, None]
    return f"{entry['acc']:.3f}{_interval(ci[0], ci[1])}"


_VERSUS = {"best": "best", "tie": "tie", "loss": "significantly lower", "win": "higher"}


def _ship_section(results: dict | None) -> str:
    ship = (results or {}).get("ship")
    if not ship:
        return _missing(
            "No verdict yet: the methods have not been trained and attacked.", "transferlab run"
        )
    under = f"{ship.get('attack') or 'the gate attack'} at {ship['eps'].removeprefix('eps_')}"
    head = f"<p><b>Ship <code>{_esc(ship['recommended'])}</code></b>: {_esc(ship['why'])}.</p>" + (
        f"<p>A <b>tie</b> (no significant difference, paired McNemar test at level "
        f"{ship['alpha']:g}) with: {_esc(', '.join(ship['ties']))}.</p>"
        if ship["ties"]
        else ""
    )
    robust = ship.get("for_robustness")
    if robust:
        m, methods = robust["method"], ship["methods"]
        cost = robust["clean_cost"]
        head += (
            f"<p><b>Need robustness? Ship <code>{_esc(m)}</code></b>: robust accuracy "
            f"{_acc(methods[m]['robust'])} under {_esc(under)} against "
            f"{_acc(methods[ship['recommended']]['robust'])} for {_esc(ship['recommended'])} "
            f"(significantly higher, {_esc(robust['test'])})"
            + (f", for a clean accuracy cost of {cost:.3f}" if cost is not None else "")
            + ".</p>"
        )

    def cells(e: dict, kind: str) -> str:
        versus = e[f"{kind}_vs_best"]
        return f'<td class="num">{_acc(e[kind])}</td><td>{_esc(_VERSUS.get(versus, versus))}</td>'

    rows = "".join(
        f"<tr><td>{_esc(m)}{' <b>(ship)</b>' if m == ship['recommended'] else ''}</td>"
        f"{cells(e, 'clean')}{cells(e, 'robust')}</tr>"
        for m, e in ship["methods"].items()
    )
    table = (
        "<table><tr><th>method</th><th>clean accuracy [95% CI]</th><th>vs best</th>"
        f"<th>robust accuracy, {_esc(under)} [95% CI]</th><th>vs best</th></tr>{rows}</table>"
    )
    gate_rows = "".join(
        f"<tr><td>{_esc(m)}</td><td><b>{_esc(g['decision'])}</b></td>"
        f"<td>{_esc(g['champion_version'] or 'none yet')}</td>"
        f"<td>{'<br>'.join(_esc(r) for r in g['reasons'])}</td></tr>"
        for m, g in (ship.get("gate") or {}).items()
    )
    gate = (
        "<h3>Promotion gate (champion)</h3><p>Judged under "
        f"{_esc(under)}: an image counts as robust only if it survives every attack listed. "
        "The champion changes only on significant differences.</p>"
        "<table><tr><th>method</th><th>gate decision</th><th>current champion</th>"
        f"<th>why</th></tr>{gate_rows}</table>"
        if gate_rows
        else ""
    )
    return head + table + gate


def _ladder_section(results: dict | None, root: Path) -> str:
    rows = (results or {}).get("table") or []
    if not rows:
        return _missing("No method has been trained and reported yet.", "transferlab run")
    # an accuracy's 95% interval goes into its cell, not into columns of its own
    keys = [
        k
        for k in dict.fromkeys(k for row in rows for k in row)
        if not k.endswith(("_ci_low", "_ci_high"))
    ]
    head = "".join(f"<th>{_esc(k)}</th>" for k in keys)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if isinstance(row.get(k), int | float) else ""}">'
            f"{_fmt(row.get(k))}{_interval(row.get(f'{k}_ci_low'), row.get(f'{k}_ci_high'))}</td>"
            for k in keys
        )
        + "</tr>"
        for row in rows
    )
    return (
        "<p>Each method adapts the same ImageNet backbone. Robust accuracy is measured at the "
        "configured report eps. Brackets: 95% Wilson interval over the test images.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
    )


def _plots_section(root: Path, patterns: tuple[str, ...], what: str, how: str) -> str:
    found = sorted({p for pat in patterns for p in (root / "plots").glob(pat)})
    if not found:
        return _missing(f"No {what} yet.", how)
    return "".join(
        f"<figure>{_img(p, p.stem)}<figcaption class='muted'>{_esc(p.name)}</figcaption></figure>"
        for p in found
    )


def _examples_section(root: Path) -> str:
    grids = _plots_section(
        root,
        ("adversarial*.png", "adv_examples*.png", "examples*.png"),
        "adversarial example grids",
        "transferlab attack",
    )
    attack = _read_json(root / "metrics/attack.json")
    rows = attack.get("grid", []) if isinstance(attack, dict) else []
    if not rows:
        return grids
    listed = ", ".join(f"{r['model']} / {r['attack']}" for r in rows)
    return (
        f"<p>One test image per row, attacked at the report eps: clean, the perturbation, the "
        f"adversarial image. Rows (model / attack): <span class='grid-rows'>{_esc(listed)}"
        f"</span>.</p>{grids}"
    )


def _learning_curve_section(root: Path) -> str:
    found = sorted((root / "plots").glob("learning_curve*.png")) + sorted(
        (root / "docs/learning_curve").glob("*.png")
    )
    if not found:
        return _missing(
            "The learning-curve experiment has not been run in this workspace.",
            "transferlab experiment learning-curve",
        )
    return "".join(_img(p, p.stem) for p in found[:1])


def _eps(flag: dict) -> str:
    return f"{flag['eps'] * 255:.3g}/255" if "eps" in flag else ""


def _training_flags(root: Path) -> list[dict]:
    """Each method's under-trained check (``sanity`` in ``metrics/<method>.json``) as a flag."""
    from transferlab.methods import METHODS

    flags = []
    for name, method in METHODS.items():
        sanity = (_read_json(root / method.metrics_file) or {}).get("sanity") or {}
        if sanity.get("under_trained"):
            flags.append(
                {"level": "warn", "check": f"under-trained: {sanity['why']}", "model": name}
            )
    return flags


def _sanity_section(root: Path) -> str:
    attack = _read_json(root / "metrics/attack.json")
    if attack is None:
        return _missing("No attack has run yet.", "transferlab attack")
    flags = _training_flags(root) + attack.get("sanity", [])
    if not flags:
        return "<p class='ok'>All sanity checks passed.</p>"
    rows = "".join(
        f"<tr><td class='flag-{_esc(f['level'])}'>{_esc(f['level'])}</td><td>{_esc(f['check'])}"
        f"</td><td>{_esc(f.get('model', ''))} {_esc(f.get('attack', ''))}</td>"
        f"<td class='num'>{_eps(f)}</td></tr>"
        for f in flags
    )
    return (
        "<p>'fail' is a bug in the measurement; 'note' is legitimate but worth a look.</p>"
        f"<table><tr><th>level</th><th>check</th><th>where</th><th>eps</th></tr>{rows}</table>"
    )


DEFAULT_UI = "http://127.0.0.1:5000"  # `transferlab ui`'s default


def mlflow_ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of a store is: the server itself for an HTTP store, else the local
    ``transferlab ui`` (whose ``--port`` the page takes from ``?mlflow=URL``, see ``_UI_JS``)."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else DEFAULT_UI


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Link to a run in the MLflow UI."""
    return f"{mlflow_ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


# `transferlab ui --port P` prints the report's address with ?mlflow=http://HOST:P; this points
# every MLflow link of the page at that UI instead of the one known when the report was written.
_UI_JS = (
    "<script>(function(){var b=new URLSearchParams(location.search).get('mlflow');"
    "if(!b)return;b=b.replace(/\\/$/,'');"
    "document.querySelectorAll('a[data-mlflow]').forEach(function(a){"
    "a.href=b+a.getAttribute('data-mlflow');});})();</script>"
)


def _mlflow_link(base: str, path: str, text: str) -> str:
    return f'<a href="{_esc(base + path)}" data-mlflow="{_esc(path)}">{_esc(text)}</a>'


def _lineage_section(results: dict | None) -> str:
    if not results:
        return _missing("No run has been tracked yet.", "transferlab report")
    tags = results.get("tags", {})
    ml = results.get("mlflow", {})
    items = [(k, _esc(v)) for k, v in sorted(tags.items()) if not k.startswith("prefect.")]
    uri, exp = ml.get("tracking_uri", ""), ml.get("experiment_id", "")
    base = mlflow_ui_base(uri)
    for name, value in ml.items():
        if name in ("tracking_uri", "experiment_id") or name.startswith("model_name."):
            continue
        if name.startswith("model_version."):
            method = name.removeprefix("model_version.")
            model = ml.get(f"model_name.{method}")
            link = (
                _mlflow_link(base, f"/#/models/{model}/versions/{value}", f"{model} v{value}")
                if model
                else _esc(value)
            )
            items.append((f"model version: {method}", link))
            continue
        path = f"/#/experiments/{exp}/runs/{value}"
        items.append((f"MLflow run: {name}", _mlflow_link(base, path, value)))
    if "prefect.flow_run_id" in tags:
        url = tags.get("prefect.flow_run_url")
        link = (
            f'<a href="{_esc(url)}">{_esc(tags["prefect.flow_run_id"])}</a>'
            if url
            else _esc(tags["prefect.flow_run_id"])
            + " <span class='muted'>(ephemeral: no UI)</span>"
        )
        items.append(("Prefect flow run", link))
    else:
        items.append(("Prefect flow run", "<span class='muted'>not run by Prefect</span>"))
    items.append(("tracking store", _esc(uri)))
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>{_UI_JS}"


def write_html_report(root: Path, out: Path, *, title: str, thumbs_per_class: int = 8) -> Path:
    """Render every section from the workspace ``root`` into one HTML file (atomically)."""
    results = _read_json(root / "reports/results.json")
    bodies = {
        "ship": _ship_section(results),
        "data": _data_section(root, thumbs_per_class),
        "ladder": _ladder_section(results, root),
        "robustness": _plots_section(
            root, ("robustness*.png",), "robustness curves", "transferlab attack"
        ),
        "examples": _examples_section(root),
        "transfer": _plots_section(
            root, ("transfer*.png",), "transfer matrix", "transferlab attack"
        ),
        "learning-curve": _learning_curve_section(root),
        "sanity": _sanity_section(root),
        "lineage": _lineage_section(results),
    }
    nav = "".join(f'<a href="#{key}">{_esc(name)}</a>' for key, name in SECTIONS)
    sections = "".join(
        f'<section id="{key}"><h2>{_esc(name)}</h2>{bodies[key]}</section>'
        for key, name in SECTIONS
    )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_esc(title)}</h1><p>Which adaptation should I ship, and how easily is it "
        f"fooled?</p></header><nav>{nav}</nav><main>{sections}</main></body></html>"
    )
    with atomic_write(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
