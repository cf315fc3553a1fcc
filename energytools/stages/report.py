"""`energytools report`: one self-contained HTML file to look at energies, curation and results.

Sections, in order: Distillation (the comparison of runs first, so it is on screen when the
page opens), Scores (one per score table), Tables compared (two or more score tables),
Curation (HE-DA shards), Label issues (one per label-issues file), Out-of-distribution (tables
scored with --reference, given with --ood or --known-ood). Tables are HTML tables with every row shown and numbers rounded
(:mod:`energytools.summaries`, which the study scripts write docs/results/ with).

Every plot is drawn from aggregates (histogram counts computed here with numpy/polars), so a
1.28M-row table makes a report of a few MB in seconds. plotly.js is embedded once.

Every name that comes from data (class names, run and directory names, paths, metadata of
the tables read) goes through :func:`text` on its way into a figure, and through
:func:`~energytools.summaries.html_table` (which escapes) into a table.

This module finds the inputs and assembles the page; the sections' parts come from
report_figures (score tables, shards, shared helpers), report_runs (distill runs),
report_tables (tables compared) and report_issues (label issues).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from plotly.offline import get_plotlyjs

from ..console import console, headline
from ..data.shards import MANIFEST, read_manifest
from ..energy import GROUPS
from ..errors import UserError
from ..io import atomic_path, check_output_free
from ..summaries import text
from ..table import LABEL_ISSUES_KIND, load_table, read_metadata
from .report_figures import Inputs, Section, curation_figures, score_figures, temperatures_text, thumbnail_strip
from .report_issues import label_issue_section
from .report_ood import ood_sections
from .report_runs import read_runs, run_names, run_parts
from .report_tables import comparison_sections
from .profile import PROFILE_KIND

__all__ = ["Inputs", "build_report", "discover", "read_runs", "render", "report", "run_names", "run_parts",
           "score_figures"]


def _is_train_run(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("stage") == "train"
    except (OSError, ValueError, AttributeError):
        return False


#: the kinds of Parquet file the report reads (the ``kind`` of their metadata) -> where it files them
PARQUET_KINDS = {"scores": "scores", LABEL_ISSUES_KIND: "label_issues", PROFILE_KIND: "profiles"}


def discover(paths: list[Path | str]) -> Inputs:
    """Find score tables, label-issues files, shard directories, distill runs and teacher runs in
    files and run directories."""
    found = Inputs()

    def visit(path: Path, depth: int = 0):
        if path.is_file() and path.suffix == ".parquet":
            kind = PARQUET_KINDS.get(read_metadata(path).get("kind"))
            if kind is not None:
                getattr(found, kind).append(path)
            elif depth == 0:
                raise UserError(f"{path} is not an energytools score table, label-issues or profile file")
        elif path.is_dir():
            if (path / MANIFEST).exists():
                found.shards.append(path)
            elif (path / "summary.json").exists() and (path / "metrics.parquet").exists():
                found.runs.append(path)
            elif (path / "metrics.parquet").exists() and _is_train_run(path):
                found.teachers.append(path)
            elif depth < 3:
                for child in sorted(path.iterdir()):
                    if not child.name.startswith("."):
                        visit(child, depth + 1)
        elif depth == 0:
            raise UserError(f"{path} does not exist")

    for p in paths:
        visit(Path(p))
    if not (found.scores or found.shards or found.runs or found.label_issues):
        raise UserError(f"no energytools outputs found in {', '.join(map(str, paths))}")
    return found


def build_report(inputs: Inputs, thumbnails: bool = True, baseline: str | None = None) -> list[Section]:
    """Sections of the report: (title, parts by name, HTML under the title)."""
    sections: list[Section] = []
    tables, metas = {}, {}
    for path in inputs.scores:
        frame, meta = load_table(path, ["sample_id", "label", "pred", "correct", "energy", "confidence",
                                        "energy_group"])
        tables[path] = frame
        metas[path] = meta
    if inputs.runs:
        parts, intro = run_parts(inputs, tables, metas, baseline)
        sections.append(("Distillation", parts, intro))
    for path, frame in tables.items():
        meta = metas[path]
        label = f"{path.name} ({meta.split})"
        s = meta.summary
        accuracy = "n/a (no labels)" if s["accuracy"] is None else f"{s['accuracy']:.2f}%"
        unlabelled = f" ({text(s['unlabelled'])} without labels)" if s.get("unlabelled") else ""
        scored_by = f" {text(s['scored_by'])}" if s.get("scored_by") else ""  # fold teachers' tables say how
        summary = (f"<p>{text(s['samples'])} samples{unlabelled}{scored_by}, teacher {text(meta.teacher.arch)} "
                   f"accuracy {accuracy}, T_E {text(meta.energy_temperature)}, groups low &le; "
                   f"{meta.thresholds['low_max']:.3f}, high &ge; {meta.thresholds['high_min']:.3f}, temperatures "
                   f"{temperatures_text(dict(zip(GROUPS, meta.rule.temperatures)))} (low / mid / high)</p>")
        extra = thumbnail_strip(frame, meta) if thumbnails else ""
        sections.append((f"Scores: {label}", score_figures(frame, meta, label), summary + extra))
    if len(tables) > 1:
        sections += comparison_sections(tables, metas)
    train_path = next((p for p in inputs.scores if metas[p].split == "train"), None)
    train_table, train_meta = (tables[train_path], metas[train_path]) if train_path else (None, None)
    for directory in inputs.shards:
        manifest = read_manifest(directory)
        sel = manifest["selection"]
        summary = (f"<p>{text(manifest['rows'])} augmented samples from {text(sel['count'])} selected "
                   f"({text(sel['select'])}, ratio {text(sel['ratio'])}, energy {sel['energy_min']:.3f} .. "
                   f"{sel['energy_max']:.3f}), policy {text(manifest['config']['policy'])}</p>")
        sections.append((f"Curation: {directory.name}", curation_figures(directory, train_table, train_meta),
                         summary))
    sections += [label_issue_section(path, thumbnails) for path in inputs.label_issues]
    return sections


#: sorts a table by the clicked column: numbers by their data-sort value, text alphabetically
SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.order !== 'up';
  th.dataset.order = up ? 'up' : 'down';
  const key = row => { const cell = row.cells[i], n = parseFloat(cell.dataset.sort ?? cell.textContent);
                       return isNaN(n) ? cell.textContent : n; };
  [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return up ? order : -order;
  }).forEach(row => body.appendChild(row));
}));
"""

STYLE = ("body{font-family:sans-serif;margin:1.5em 2em;max-width:1280px} h1{margin:0 0 .3em} h2{margin:1em 0 .3em}"
         " .strip{display:flex;flex-wrap:wrap} figure{margin:4px;text-align:center;font-size:11px}"
         " img{image-rendering:pixelated;border:1px solid #ccc}"
         " table{border-collapse:collapse;font-size:13px;margin:.3em 0 .8em}"
         " th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}"
         " th{background:#f2f2f2;cursor:pointer} td.num{text-align:right;font-variant-numeric:tabular-nums}"
         " tr.highlight td{background:#fff4cc} .note{color:#555;font-size:12px;max-width:1100px}")


def render(sections: list[Section], title: str = "energytools report") -> str:
    body = []
    for heading, parts, extra in sections:
        body.append(f"<section><h2>{text(heading)}</h2>{extra}")
        for name, part in parts.items():
            content = part if isinstance(part, str) else part.to_html(include_plotlyjs=False, full_html=False,
                                                                       config={"displaylogo": False})
            body.append(f"<div class='{'table' if isinstance(part, str) else 'fig'}' "
                        f"data-name='{html.escape(name)}'>{content}</div>")
        body.append("</section>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{GENERATOR}<title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body><h1>{html.escape(title)}</h1>{''.join(body)}<script>{SORT_SCRIPT}</script></body></html>")


#: what marks a file as a report energytools wrote, which a new report may replace
GENERATOR = "<meta name='generator' content='energytools report'>"


def is_report(path: Path) -> bool:
    """Whether ``path`` is an HTML report energytools wrote (reports before the marker have its title)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return GENERATOR in head or "<title>energytools report</title>" in head


def report(paths: list[Path | str], out: Path | str = "report.html", overwrite: bool | None = None,
           thumbnails: bool = True, baseline: str | None = None, label_issues: list[Path | str] = (), ood=(),
           known_ood=()) -> Path:
    """Write the HTML report for run directories or files; returns its path. ``baseline`` names the
    configuration, run or method the runs are compared with (default: kd; see
    :func:`~energytools.stages.report_runs.choose_baseline`). ``label_issues``: label-issues
    files (`energytools label-issues`), each a section (also found among ``paths``). An existing
    ``out`` is replaced when it is a report energytools wrote (``overwrite`` None, the default) or
    whatever it is (``overwrite`` True); ``overwrite`` False replaces nothing. ``ood`` and
    ``known_ood`` are tables scored with `score --reference` (the second: of inputs known to be
    out of distribution), each shown against its reference's validation scores."""
    out = Path(out)
    check_output_free(out, overwrite if overwrite is not None else out.is_file() and is_report(out))
    for path in label_issues:  # one line for a file that is not one, before any work
        if read_metadata(path).get("kind") != LABEL_ISSUES_KIND:
            raise UserError(f"--label-issues {path} is not an energytools label-issues file (write one with "
                            "`energytools label-issues`)")
    given = list(dict.fromkeys(Path(p) for p in [*paths, *label_issues]))
    inputs = discover(given) if given or not (ood or known_ood) else Inputs()
    sections = build_report(inputs, thumbnails, baseline) + ood_sections(list(ood), list(known_ood))
    html_text = render(sections)
    with atomic_path(out) as tmp:
        tmp.write_text(html_text)
    issues = f", {len(inputs.label_issues)} label-issues file(s)" if inputs.label_issues else ""
    console.print(headline("done", f": wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {len(inputs.scores)} "
                                   f"table(s), {len(inputs.shards)} shard set(s), {len(inputs.runs)} run(s){issues}"
                                   + (f", {len(ood) + len(known_ood)} OOD table(s)" if ood or known_ood else "")))
    return out
