"""The report folder: written into a temporary sibling and renamed into place only when complete.

Usage:
    with staged_report(Path("reports/demo-20250101T000000")) as tmp:
        figures = heatmaps(summary, tmp)
        write_index(tmp, "headwatch demo", facts, figures, rows)
    # the folder exists now, with index.html; an exception leaves no folder behind

An interrupted run leaves at most a hidden `.<name>.partial-<pid>` folder, never a folder that
looks complete: index.html is the last file written and the rename is atomic on one filesystem.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from headwatch.report.errors import ReportError
from headwatch.report.figures import Figure
from headwatch.report.table import HEADER, StudyRow, row_cells

logger = logging.getLogger(__name__)
INDEX = "index.html"


def check_report_folder(final: Path) -> None:
    """Raise ReportError unless `final` is a new or empty folder (check before long work)."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        kind = "folder" if final.is_dir() else "file"
        raise ReportError(f"expected a new or empty report folder, got existing {kind} {final}")


@contextmanager
def staged_report(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; rename it to `final` on success, delete it on any exception."""
    check_report_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / INDEX).is_file():
            raise ReportError(f"expected {INDEX} in the staged report, got none")
        if final.exists():
            final.rmdir()
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("report written to %s", final)


def _table_html(rows: Sequence[StudyRow]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(r)) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f4f4f4; }
figure { margin: 1.5em 0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; }
"""


def write_index(
    folder: Path,
    title: str,
    facts: dict[str, str],
    figures: Sequence[Figure],
    rows: Sequence[StudyRow],
    pattern_map: str = "",
) -> Path:
    """Write index.html showing the facts, the study-style table, the pattern map and the figures."""
    for fig in figures:
        if not (folder / fig.file).is_file():
            raise ReportError(f"expected figure {fig.file} in {folder}, got nothing")
    fact_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items()
    )
    figs = "".join(
        f'<figure><img src="{html.escape(f.file)}" alt="{html.escape(f.caption)}">'
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
    )
    pre = f"<h2>Pattern map</h2><pre>{html.escape(pattern_map)}</pre>" if pattern_map else ""
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table>{fact_rows}</table><h2>Patterns (study-style table)</h2>{_table_html(rows)}"
        f"{pre}<h2>Figures</h2>{figs}</body></html>\n"
    )
    path = folder / INDEX
    path.write_text(page, encoding="utf-8")
    return path
