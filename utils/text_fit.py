"""Text that fits its room in a matplotlib figure at whatever size and dpi it is drawn: `fit_text` shortens one text
to a width, `TextFitter` (an artist that draws nothing) refits texts at every draw, after the layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from matplotlib.artist import Artist
from matplotlib.backend_bases import RendererBase
from matplotlib.figure import Figure
from matplotlib.text import Text

ELLIPSIS = "…"


def fit_text(text: Text, renderer: RendererBase, width: float, candidates: Sequence[str], suffix: str = "") -> None:
    """Set `text` to the first of `candidates` + suffix at most `width` display pixels wide as `renderer` draws it;
    else the last candidate with its last line cut to the longest start that fits (trailing spaces and punctuation
    dropped) and an ellipsis "…" (+ suffix while at least one character stays, else without it); else its lines
    above the last and "…", or "" when it has one line (not even the ellipsis fits)."""
    def fits(s: str) -> bool:
        text.set_text(s)
        return text.get_window_extent(renderer).width <= width

    if any(fits(s + suffix) for s in candidates):
        return
    head, newline, last = candidates[-1].rpartition("\n")  # the lines above the last are kept whole
    for end, least in ((suffix, 1), ("", 0)) if suffix else (("", 0),):
        def cut(n: int, end: str = end) -> str:
            return head + newline + last[:n].rstrip(" ,;:-") + ELLIPSIS + end

        lo, hi = least - 1, len(last)  # the first lo characters fit (lo = least - 1: not even `least` do)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(cut(mid)) else (lo, mid - 1)
        if lo >= least:
            text.set_text(cut(lo))
            return
    text.set_text(head + newline + ELLIPSIS if head else "")


class TextFitter(Artist):
    """Draws nothing: added to a figure, it runs at every draw after the layout and before the other artists (lowest
    zorder) and fits each text given to `add` to its room (`fit_text`), so long labels are shortened for whatever
    size and dpi the figure is drawn at. When that changes a text the layout reads (a title), the figure's layout
    engine runs again and the texts are fitted to the new layout (savefig lays a figure out once)."""

    zorder = -1e9

    def __init__(self) -> None:
        super().__init__()
        self.set_in_layout(False)
        self._texts: list[tuple[Text, Callable[[RendererBase], float], list[str], str]] = []

    def add(self, text: Text, room: Callable[[RendererBase], float], candidates: Sequence[str],
            suffix: str = "") -> Text:
        """Fit `text` into room(renderer) display pixels at every draw; candidates: longest first."""
        text.set_text(candidates[0] + suffix)
        self._texts.append((text, room, list(candidates), suffix))
        return text

    def draw(self, renderer: RendererBase) -> None:
        before = [text.get_text() for text, *_ in self._texts]
        self._fit(renderer)
        engine = self.figure.get_layout_engine() if isinstance(self.figure, Figure) else None
        if engine is not None and any(text.get_in_layout() and text.get_text() != old
                                      for (text, *_), old in zip(self._texts, before, strict=True)):
            engine.execute(self.figure)
            self._fit(renderer)
        self.stale = False

    def _fit(self, renderer: RendererBase) -> None:
        for text, room, candidates, suffix in self._texts:
            fit_text(text, renderer, room(renderer), candidates, suffix)
