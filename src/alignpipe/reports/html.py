"""The shared frame of every report page: escaping, the inline style sheet, the document shell."""

from __future__ import annotations

import html
import math
from typing import Any

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#1b1f24}
h1{font-size:20px;margin:0 0 6px}h2{font-size:16px;margin:18px 0 6px}
.summary{margin:0 0 10px}.bad{color:#b00020;font-weight:600}.good{color:#0a7d2c;font-weight:600}
table{border-collapse:collapse;margin:4px 0 12px;width:100%}
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f3f5f7}tr.fail td{background:#fdecee}tr.best td{background:#eaf6ec}
code,.value{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
word-break:break-all}
figure{margin:8px 0}img{max-width:100%;height:auto}figcaption{color:#57606a;font-size:12px}
"""


def esc(value: Any) -> str:
    """`value` as HTML text: every character that could open markup escaped."""
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    """A number with `digits` significant digits; "n/a" for a missing or non-finite one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def document(title: str, body: str) -> str:
    """A complete HTML document around `body` (already escaped markup)."""
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")
