"""What a finished run writes beside its adapter: the model card (README.md) and the loss plot.

Notable choices:
- The plot is a hand-written SVG (train loss line, eval loss dots): no plotting dependency, viewable in a
  browser and on the Hub, and text-diffable. matplotlib is not a glmapp dependency.
"""

from __future__ import annotations

import hashlib
import html
from pathlib import Path


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loss_svg(log: list[dict], width: int = 640, height: int = 360) -> str:
    """SVG line chart of `loss` (and `eval_loss` points) against `step` from trainer_log.jsonl entries."""
    train = [(e["step"], e["loss"]) for e in log if e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in log if e.get("eval_loss") is not None]
    points = train + evals
    pad = 48
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def xy(step, loss):
            return (pad + (step - x0) / (x1 - x0) * (width - 2 * pad),
                    height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad))

        parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>')
        parts.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>')
        parts.append(f'<text x="{pad}" y="{height - pad + 16}">{x0}</text>'
                     f'<text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">step {x1}</text>'
                     f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.3g}</text>'
                     f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3g}</text>')
        if train:
            line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(*p) for p in train))
            parts.append(f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for p in evals:
            x, y = xy(*p)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#ff7f0e"/>')
        parts.append(f'<text x="{width - pad}" y="{pad - 16}" text-anchor="end">'
                     f'<tspan fill="#1f77b4">train loss</tspan>'
                     + (' <tspan fill="#ff7f0e">● eval loss</tspan>' if evals else "") + "</text>")
    else:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no loss logged</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def model_card(config: dict, base_model: str, family: str, data_files: list[dict], report_lines: list[str],
               summary: dict) -> str:
    """README.md of the adapter folder: base, data (with sha256), every hyperparameter, results."""
    rows = "\n".join(f"| `{html.escape(str(k))}` | `{html.escape(str(v))}` |" for k, v in config.items())
    data = "\n".join(f"- `{d['name']}`: {d['examples']} examples, format {d['format']}, sha256 `{d['sha256']}`"
                     for d in data_files)
    results = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in summary.items())
    validation = "\n".join(f"- {line}" for line in report_lines)
    return f"""---
library_name: peft
base_model: {base_model}
tags: [lora, chatglm, glmapp]
---
# LoRA adapter for {base_model}

Trained with `glmapp train` (transformers Trainer + peft) on a {family} model.

## Data
{data}

{validation}

## Results
{results}

![loss](loss.svg)

## Hyperparameters
| setting | value |
|---|---|
{rows}
"""
