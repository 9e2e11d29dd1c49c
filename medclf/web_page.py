"""The page `medclf serve` shows at /: drop images, see each one's probabilities, decision and Grad-CAM.

One self-contained HTML document (inline CSS and JS, no CDN), so it works on a machine with no network.
Text from the model (class names, paths) is escaped here and set with textContent in the script.
"""
from __future__ import annotations

from html import escape

HEADLINE = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auc": "ROC AUC", "f1_macro": "macro F1"}
SPLIT_NAMES = {"val": "validation", "oof": "out-of-fold", "test": "test"}

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f5f7f9}
header{background:#1f3b57;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85}main{max-width:1200px;margin:0 auto;padding:16px 24px}
.use{background:#fff8e1;border-left:4px solid #e0a800;padding:8px 12px;margin:0 0 12px}
table.metrics{border-collapse:collapse;background:#fff;margin:6px 0 14px}
table.metrics td,table.metrics th{border:1px solid #d5dbe1;padding:3px 9px;text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
#drop{border:2px dashed #7a8b9c;border-radius:8px;background:#fff;padding:26px;text-align:center;cursor:pointer}
#drop.over{background:#e8f1fb;border-color:#1f6fc5}
.card{display:grid;grid-template-columns:200px 200px 1fr;gap:14px;background:#fff;border:1px solid #d5dbe1;
border-radius:8px;padding:12px;margin:12px 0;align-items:start}
.card img{width:200px;height:200px;object-fit:contain;background:#000;border-radius:4px}
.card h3{margin:0 0 6px;font-size:15px;word-break:break-all}.decision{font-size:18px;font-weight:600}
.bar{display:grid;grid-template-columns:minmax(80px,30%) 1fr 60px;gap:6px;align-items:center;margin:3px 0}
.bar div.track{background:#e6eaee;height:12px;border-radius:6px;overflow:hidden}
.bar div.fill{background:#1f6fc5;height:100%}.error{color:#b00020;font-weight:600}.muted{color:#66737f}
@media (max-width:760px){.card{grid-template-columns:1fr}}
"""

SCRIPT = """
const drop = document.getElementById('drop'), input = document.getElementById('files');
const results = document.getElementById('results');
drop.addEventListener('click', () => input.click());
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); handle(e.dataTransfer.files); });
input.addEventListener('change', () => { handle(input.files); input.value = ''; });

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function errorText(response) {
  try { const body = await response.json(); return body.detail || response.statusText; }
  catch (e) { return response.status + ' ' + response.statusText; }
}

function handle(files) { for (const file of files) analyse(file); }

async function analyse(file) {
  const card = el('div', 'card'); card.dataset.file = file.name;
  const original = el('img'); original.alt = 'uploaded image'; original.src = URL.createObjectURL(file);
  const cam = el('img', 'gradcam'); cam.alt = 'Grad-CAM overlay';
  const info = el('div'); info.appendChild(el('h3', '', file.name));
  const status = el('p', 'status muted', 'analysing…'); info.appendChild(status);
  card.append(original, cam, info); results.prepend(card);
  const form = new FormData(); form.append('files', file, file.name);
  const response = await fetch('predict', {method: 'POST', body: form});
  if (!response.ok) { status.className = 'status error'; status.textContent = await errorText(response); card.dataset.state = 'error'; return; }
  const result = (await response.json()).results[0];
  status.remove();
  const decided = el('p', 'decision'); decided.textContent = 'Decision: ' + result.decision;
  info.appendChild(decided);
  const note = result.threshold === null ? 'highest probability' :
    'threshold ' + result.threshold.toFixed(3) + ' on P(' + Object.keys(result.probabilities)[1] + '), chosen on validation';
  info.appendChild(el('p', 'muted', note));
  if (result.prediction !== result.decision)
    info.appendChild(el('p', 'muted', 'Highest probability: ' + result.prediction + ' (the decision uses the threshold)'));
  for (const [name, p] of Object.entries(result.probabilities)) {
    const bar = el('div', 'bar'); bar.appendChild(el('span', 'class', name));
    const track = el('div', 'track'), fill = el('div', 'fill'); fill.style.width = (100 * p).toFixed(1) + '%';
    track.appendChild(fill); bar.append(track, el('span', 'prob', p.toFixed(3))); info.appendChild(bar);
  }
  card.dataset.prediction = result.prediction; card.dataset.decision = result.decision;
  const explained = await fetch('explain', {method: 'POST', body: form});
  if (explained.ok) { cam.src = URL.createObjectURL(await explained.blob()); }
  else { info.appendChild(el('p', 'error', 'Grad-CAM: ' + await errorText(explained))); }
  card.dataset.state = 'done';
}
"""


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _metrics_table(headline: dict) -> str:
    columns = []
    est = headline.get("estimate")
    if est:
        columns.append((f"expected on new images ({est['n']} images)",
                        {m: est[m]["value"] if m in est else None for m in HEADLINE},
                        {m: est[m]["ci95"] if m in est else None for m in HEADLINE}))
    for split, values in headline.get("splits", {}).items():
        columns.append((f"{SPLIT_NAMES.get(split, split)} ({values['n']} images)", values, {}))
    if not columns:
        return '<p class="muted">No metrics.json next to this model: its validation metrics are unknown.</p>'
    head = "".join(f"<th>{escape(name)}</th>" for name, _, _ in columns)
    rows = []
    for metric, label in HEADLINE.items():
        cells = []
        for _, values, cis in columns:
            ci = cis.get(metric)
            cells.append(f"<td>{fmt(values.get(metric))}"
                         f"{f' <span class=muted>[{fmt(ci[0])}, {fmt(ci[1])}]</span>' if ci else ''}</td>")
        rows.append(f"<tr><td>{escape(label)}</td>{''.join(cells)}</tr>")
    return f'<table class="metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def render_page(manifest: dict, headline: dict, max_upload_bytes: int) -> str:
    classes = ", ".join(manifest["classes"])
    model = manifest["model"]
    warnings = "".join(f'<p class="muted">{escape(w)}</p>' for w in headline.get("warnings", []))
    card = f" (model card: {escape(headline['card'])})" if headline.get("card") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>medclf: {escape(classes)}</title><style>{STYLE}</style></head>
<body><header><h1>medclf classifier: {escape(classes)}</h1>
<p>{escape(model['arch'])}, {manifest['input']['height']} px, {manifest['input']['channels']} channel(s); decision:
{escape(manifest['decision']['rule'])}</p></header>
<main>
<p class="use"><b>Intended use.</b> {escape(headline['intended_use'])}{card}</p>
<h2>Validation metrics</h2>{_metrics_table(headline)}{warnings}
<div id="drop" role="button" tabindex="0">Drop PNG, JPEG or DICOM images here, or click to choose
(up to {max_upload_bytes / 1e6:.0f} MB per request)<input id="files" type="file" multiple hidden
accept="image/png,image/jpeg,.dcm,application/dicom"></div>
<div id="results"></div>
<p class="muted">API: <a href="docs">/docs</a> · <a href="model">/model</a> · <a href="health">/health</a></p>
</main>
<script>{SCRIPT}</script>
</body></html>"""
