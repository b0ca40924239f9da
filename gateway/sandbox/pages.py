"""HTML for the sandbox's fake provider pages: one stylesheet, no script, a strict CSP.

Callers pass text, never markup, except what they built with `html.escape` themselves; the
Content-Security-Policy forbids every script, so even a slip could not run one.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.responses import HTMLResponse

STYLE = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c2430;background:#e9edf2}
.sheet,body>h1,body>p{max-width:26rem;margin:0 auto}
.sheet{margin-top:1.5rem;padding:1.25rem;background:#fff;border-radius:16px;box-shadow:0 2px 14px rgb(0 0 0/10%)}
body>h1{padding:1.5rem 1rem 0}body>p{padding:0 1rem}
h1{font-size:1.3rem;margin:.25rem 0}
.brand{margin:0;font-weight:700;color:#0087ff}
.tag{font-size:.7rem;font-weight:600;padding:.1rem .4rem;border-radius:6px;background:#fff4d6;color:#7a5b00}
label{display:block;font-size:.85rem;color:#5f6b7a;margin:.6rem 0 .2rem}
input,select{width:100%;padding:.55rem .7rem;font:inherit;border:1px solid #c8d0da;border-radius:8px}
button{display:block;width:100%;margin-top:.6rem;padding:.7rem;font:inherit;font-weight:600;
border:1px solid #c8d0da;border-radius:10px;background:#fff;color:#1c2430;cursor:pointer}
button.primary{background:#0087ff;border-color:#0087ff;color:#fff}
button.quiet{border:0;color:#c62828}
small{font-weight:400;color:#5f6b7a}.primary small{color:#dcecff}
.error{padding:.5rem .7rem;border-radius:8px;background:#fdecea;color:#c62828}
.muted{font-size:.8rem;color:#5f6b7a}
"""

_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Field:
    """A labelled text input; every value is escaped on the way out."""

    name: str
    label: str
    value: str
    kind: str  # the input type

    def render(self) -> str:
        name = html.escape(self.name)
        return (
            f'<label for="{name}">{html.escape(self.label)}</label>'
            f'<input id="{name}" name="{name}" type="{html.escape(self.kind)}" value="{html.escape(self.value)}"'
            ' autocomplete="off">'
        )


def html_page(title: str, body: str, *, status_code: int = 200, headers: Mapping[str, str]) -> HTMLResponse:
    """A complete page around `body` (already safe markup) with the sandbox's security headers."""
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(page, status_code=status_code, headers={**headers, "content-security-policy": CSP})
