"""Self-contained HTML pages of image thumbnails with captions (label issues, run diffs).

Thumbnails are small JPEGs embedded as data URIs, so a page is one file that opens offline and can be
mailed; nothing is fetched from anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

from PIL import Image

from .interpret import load_display
from .report import REPORT_CSS

__all__ = ["thumbnail_uri", "thumbnail_page", "PAGE_CSS"]

#: The report's style plus the thumbnail tiles.
PAGE_CSS = REPORT_CSS + """
.tiles{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:6px;width:150px}
figure img{width:138px;height:138px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:12px;line-height:1.35;word-break:break-all}
"""


def thumbnail_uri(path: str, size: int = 138) -> str:
    """A square JPEG thumbnail of an image file as a ``data:`` URI (grey for an unreadable file)."""
    buf = io.BytesIO()
    Image.fromarray(load_display(path, size)).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail_page(title: str, intro_html: str, groups: Sequence[tuple[str, Sequence[tuple[str, str]]]],
                   tail_html: str = "") -> str:
    """A page of thumbnail groups: ``groups`` is ``[(heading, [(image path, caption text), ...]), ...]``;
    captions are escaped, ``intro_html`` and ``tail_html`` are trusted HTML."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>",
             f"<style>{PAGE_CSS}</style></head><body><main><h1>{html.escape(title)}</h1>{intro_html}"]
    for heading, items in groups:
        parts.append(f"<h2>{html.escape(heading)} ({len(items)})</h2><div class='tiles'>")
        for path, caption in items:
            lines = "<br>".join(html.escape(line) for line in caption.split("\n"))
            parts.append(f"<figure><img alt='{html.escape(caption.splitlines()[0] if caption else path)}' "
                         f"src='{thumbnail_uri(path)}'><figcaption>{lines}</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"{tail_html}</main></body></html>")
    return "\n".join(parts)
