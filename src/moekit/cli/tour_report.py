"""What `moekit tour` shows, kept once for two readers: printed to the terminal as it goes, and rendered as one
self-contained HTML page (sections with headings, tables as HTML tables, inline PNG figures, generated samples,
and the headline numbers first)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from moekit.cli.bench import format_table
from moekit.inspect.report import IMAGE_CHECK


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("p", text) | ("table", cols, rows) | ("img", title, png) ...


class Report:
    """Collects the tour: `section` opens one, `say` / `table` / `sample` print and keep, `figure` keeps an image,
    `headline` records a number for the summary at the top of the page."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[Section] = []
        self.headlines: list[tuple[str, str]] = []

    def section(self, title: str) -> None:
        print(f"\n{len(self.sections) + 1}. {title}")
        self.sections.append(Section(title))

    def say(self, text: str) -> None:
        print("   " + text.replace("\n", "\n   "))
        self.sections[-1].blocks.append(("p", text))

    def code(self, text: str) -> None:
        print("   " + text.replace("\n", "\n   "))
        self.sections[-1].blocks.append(("pre", text))

    def table(self, records: list[dict], cols: list[str] | None = None, caption: str = "") -> None:
        cols = cols or list(dict.fromkeys(k for r in records for k in r))
        print(format_table(records, cols))
        rows = [["-" if r.get(c) is None else str(r[c]) for c in cols] for r in records]
        self.sections[-1].blocks.append(("table", caption, cols, rows))

    def sample(self, title: str, text: str) -> None:
        print(f"   {title}:\n      " + text.replace("\n", "\n      "))
        self.sections[-1].blocks.append(("sample", title, text))

    def figure(self, title: str, png: bytes) -> None:
        self.sections[-1].blocks.append(("img", title, png))

    def headline(self, name: str, value: str) -> None:
        self.headlines.append((name, value))

    def html(self) -> str:
        esc = html.escape
        parts = [f"<h1>{esc(self.title)}</h1>"]
        if self.headlines:
            rows = "".join(f"<tr><th>{esc(n)}</th><td>{esc(v)}</td></tr>" for n, v in self.headlines)
            parts.append(f"<section id='glance'><h2>At a glance</h2><table class='kv'>{rows}</table></section>")
        parts.append("<nav><ol>" + "".join(f"<li><a href='#s{i + 1}'>{esc(s.title)}</a></li>"
                                           for i, s in enumerate(self.sections)) + "</ol></nav>")
        for i, s in enumerate(self.sections):
            parts.append(f"<section id='s{i + 1}'><h2>{i + 1}. {esc(s.title)}</h2>")
            for block in s.blocks:
                parts.append(_render(block))
            parts.append("</section>")
        style = ("body{font-family:sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.4}"
                 "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
                 "text-align:left;font-size:.9rem}th{background:#f0f0f0}pre,.sample{background:#f6f6f6;"
                 "padding:.8rem;overflow-x:auto;white-space:pre-wrap}img{max-width:100%}figcaption{color:#555}"
                 "caption{text-align:left;color:#555;padding-bottom:.2rem}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(parts)}{IMAGE_CHECK}</body></html>")

    def write(self, out: Path) -> Path:
        """report.html in `out`, written atomically."""
        from moekit.files import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.html"
        atomic_write(path, self.html())
        return path


def _render(block: tuple) -> str:
    esc = html.escape
    kind = block[0]
    if kind == "p":
        return f"<p>{esc(block[1])}</p>"
    if kind == "pre":
        return f"<pre>{esc(block[1])}</pre>"
    if kind == "sample":
        return f"<h3>{esc(block[1])}</h3><div class='sample'>{esc(block[2])}</div>"
    if kind == "img":
        return (f"<figure><img alt='{esc(block[1])}' src='data:image/png;base64,{base64.b64encode(block[2]).decode()}'>"
                f"<figcaption>{esc(block[1])}</figcaption></figure>")
    _, caption, cols, rows = block
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
