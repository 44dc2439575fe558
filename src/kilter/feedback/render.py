"""Model outputs as safe HTML: Markdown rendered, then sanitised, with invisible characters shown.

Responses often hold Markdown (lists, code blocks), and people judge them better rendered. The
text is untrusted, so it goes through two independent guards: markdown-it-py with raw HTML
turned off (a ``<script>`` in a response becomes text) and unsafe link schemes refused, then
nh3 (the Rust ``ammonia`` sanitiser) keeping only the tags Markdown produces, links limited to
http(s)/mailto with ``rel="noopener noreferrer nofollow"``. No images: they would fetch from
other hosts (the Content-Security-Policy blocks them anyway).

Characters a reader cannot see but a model can emit -- zero-width spaces and joiners, bidi
overrides that reorder what is shown, soft hyphens, a byte-order mark -- are replaced by a
visible marker naming the code point, so two responses that look the same but differ are
seen to differ, and a bidi trick cannot make a response read as something else.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup, escape

INVISIBLE = re.compile("[\u00ad\u061c\u115f\u1160\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")
# private-use characters stand for an invisible one while Markdown and the sanitiser run
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}([0-9A-F]{{4,6}}){_CLOSE}")

TAGS = {"p", "br", "hr", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "a",
        "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td"}
# no "style": the Content-Security-Policy forbids inline styles, so table alignment is dropped
ATTRIBUTES = {"a": {"href"}, "code": {"class"}, "ol": {"start"}}


@functools.cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False, "breaks": True}).enable(["table", "strikethrough"])


def _mark(match: re.Match) -> str:
    return f"{_OPEN}{ord(match.group(0)):04X}{_CLOSE}"


def _show(match: re.Match) -> str:
    code = int(match.group(1), 16)
    name = unicodedata.name(chr(code), "invisible character")
    return f'<span class="invisible" title="U+{code:04X} {name.lower()}">U+{code:04X}</span>'


def has_invisible(text: str) -> bool:
    return INVISIBLE.search(text) is not None


def markdown(text: str) -> Markup:
    """Sanitised HTML of ``text`` read as Markdown, invisible characters made visible."""
    marked = INVISIBLE.sub(_mark, text.replace(_OPEN, "").replace(_CLOSE, ""))
    html = nh3.clean(_markdown().render(marked), tags=TAGS, attributes=ATTRIBUTES,
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer nofollow")
    return Markup(_PLACEHOLDER.sub(_show, html))


def plain(text: str) -> Markup:
    """``text`` escaped for a ``<pre>``, invisible characters made visible."""
    marked = INVISIBLE.sub(_mark, text.replace(_OPEN, "").replace(_CLOSE, ""))
    return Markup(_PLACEHOLDER.sub(_show, str(escape(marked))))


_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


def diff_html(original: str, edited: str) -> Markup:
    """A word-level diff of an edit (difflib): removed words struck through, added ones marked.

    Compared after the same line-ending normalisation as the export, so a CRLF-only "edit" shows
    as unchanged.
    """
    from difflib import SequenceMatcher

    from kilter.feedback.importer import normalized

    a, b = _TOKENS.findall(normalized(original)), _TOKENS.findall(normalized(edited))
    if a == b:
        return Markup('<p class="diff muted small">The edit left the response unchanged.</p>')
    out = []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.append(f"<del>{plain(''.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{plain(''.join(b[j1:j2]))}</ins>")
        if op == "equal":
            out.append(str(plain("".join(a[i1:i2]))))
    return Markup('<div class="diff" data-diff>' + "".join(out) + "</div>")
