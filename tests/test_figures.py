"""attention.figures.attention_figure with long class names and prompts: as drawn (the renderer's text extents),
no name overlaps its percentage or leaves the top-k panel, the title and the gradient-rollout title stay inside the
figure and their panel, and what is shown is the name, its first synonym or a start of it with an ellipsis."""

import itertools
import re

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from attention.figures import attention_figure, first_synonym
from models.vit import VisionTransformer
from utils.img2attn import explain
from utils.plots import save_figure
from utils.text_fit import ELLIPSIS

NAMES = ["Pembroke, Pembroke Welsh corgi",
         "American Staffordshire terrier, Staffordshire terrier, American pit bull terrier, pit bull terrier",
         "Granny Smith", "a photo of a very long prompt, describing a dog sitting on a sofa next to a sleeping cat",
         "tench, Tinca tinca"]
TRUE = 1


def explanation(layers: int):
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=layers, patch_size=8,
                              num_channels=3, num_patches=16, num_classes=len(NAMES)).eval()
    x = torch.randn(1, 3, 32, 32)
    return explain(model, x), x[0].permute(1, 2, 0).sigmoid().numpy()


def shown_as(text: str, name: str, kind: str, suffix: str) -> bool:
    """Whether `text` is one of the ways the figure may show `name` + suffix: as it is or as its first synonym
    (classes), else a start of the shorter one with an ellipsis (with the suffix, or without it when the name would
    be the ellipsis alone), else nothing."""
    whole = [name, first_synonym(name)] if kind == "classes" else [name]
    if text in [w + suffix for w in whole] or text == "":
        return True
    start, ellipsis, end = text.rpartition(ELLIPSIS)
    return bool(ellipsis) and whole[-1].startswith(start) and (end == suffix and start or end == "")


def saved_and_drawn(fig, path):
    """Save `fig` as the scripts do, then draw it again as saved (savefig lays it out once, on its first pass; no
    layout after it) -> the renderer, for the text extents of what was saved."""
    save_figure(fig, path)
    fig.set_layout_engine("none")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def boxes_apart(a, b) -> bool:
    return a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def inside_horizontally(box, outer, slack=0.5) -> bool:
    return outer.x0 - slack <= box.x0 and box.x1 <= outer.x1 + slack


@pytest.mark.parametrize("layers,topk,kind,legrad,scale", [
    (2, 5, "classes", False, 1.0), (4, 5, "classes", True, 1.0), (12, 3, "prompts", False, 1.0),
    (6, 1, "classes", False, 1.0), (4, 5, "classes", True, 0.75),  # the last: the figure resized after it was made
])
def test_long_labels_fit_beside_their_percentages(tmp_path, layers, topk, kind, legrad, scale):
    ex, image = explanation(layers)
    extra = {"LeGrad, a long extra title that cannot fit": (ex.rollout, "relevance")} if legrad else None
    fig = attention_figure(ex, image, class_names=NAMES, topk=topk, label=TRUE, kind=kind, extra=extra)
    fig.set_size_inches(fig.get_size_inches() * scale)
    renderer = saved_and_drawn(fig, tmp_path / "attn.png")
    with Image.open(tmp_path / "attn.png") as png:
        assert png.size[0] > 600
    upper = fig.subfigs[0]
    top = upper.axes[1]
    panel = top.get_window_extent(renderer)
    names = [t for t in top.texts if t.get_ha() == "left"]
    percents = [t for t in top.texts if t.get_ha() == "right"]
    assert len(names) == len(percents) == topk
    probs = ex.logits[0].softmax(-1)
    order = probs.topk(topk).indices.tolist()
    label_boxes = []
    for c, name, pct in zip(order, names, percents, strict=True):
        box, pbox = name.get_window_extent(renderer), pct.get_window_extent(renderer)
        assert re.fullmatch(r"\d+\.\d%", pct.get_text()) and pct.get_text() == f"{float(probs[c]):.1%}"
        assert boxes_apart(box, pbox), (name.get_text(), pct.get_text())
        assert inside_horizontally(box, panel) and inside_horizontally(pbox, panel), name.get_text()
        assert shown_as(name.get_text(), NAMES[c], kind, " (true)" if c == TRUE else ""), name.get_text()
        label_boxes.append(box)
    for a, b in itertools.pairwise(label_boxes):
        assert boxes_apart(a, b)  # rows stay apart
    title = upper._suptitle
    assert inside_horizontally(title.get_window_extent(renderer), upper.bbox), title.get_text()
    assert "predicted: " in title.get_text() and "true: " in title.get_text()
    maps = upper.axes[2:]
    grad = next(a for a in maps if a.get_title().startswith("gradient rollout"))
    shown = grad.get_title().replace("gradient rollout: ", "", 1).replace("gradient rollout\n", "", 1)
    assert shown_as(shown, NAMES[int(ex.target[0])], kind, "")
    if scale == 1:  # the sizes attention_figure picks: room for the titles' own words
        assert inside_horizontally(grad.title.get_window_extent(renderer), grad.get_window_extent(renderer))
        titles = [a.title.get_window_extent(renderer) for a in maps]
        assert all(boxes_apart(a, b) for a, b in itertools.pairwise(titles))  # map titles do not run into each other


def test_short_names_are_shown_whole_and_first_synonym():
    ex, image = explanation(2)
    names = ["corgi", "terrier", "apple", "dog", "tench"]
    fig = attention_figure(ex, image, class_names=names, topk=5, label=0)
    FigureCanvasAgg(fig).draw()
    shown = {t.get_text() for t in fig.subfigs[0].axes[1].texts if t.get_ha() == "left"}
    assert shown == {"corgi (true)", "terrier", "apple", "dog", "tench"}
    assert first_synonym("Pembroke, Pembroke Welsh corgi") == "Pembroke" and first_synonym("tench") == "tench"


def test_titles_that_take_two_lines_get_the_room_for_them(tmp_path):
    ex, image = explanation(2)  # a narrow figure: the grid's title and the gradient-rollout title wrap
    fig = attention_figure(ex, image, class_names=NAMES, kind="prompts", query="attention-pool query")
    renderer = saved_and_drawn(fig, tmp_path / "attn.png")
    upper, lower = fig.subfigs
    grid_title = lower._suptitle.get_window_extent(renderer)
    assert "\n(no class token" in lower._suptitle.get_text()
    assert inside_horizontally(grid_title, lower.bbox)
    assert all(boxes_apart(grid_title, a.title.get_window_extent(renderer)) for a in fig.axes if a.get_title())
    for a in upper.axes[2:]:  # every map's title above its panel
        assert a.title.get_window_extent(renderer).y0 >= a.get_window_extent(renderer).y1 - 0.5, a.get_title()


def test_grid_title_names_the_query_of_a_model_without_class_token():
    ex, image = explanation(2)
    fig = attention_figure(ex, image, class_names=NAMES, query="average pool")  # a GAP model (prefix_names)
    FigureCanvasAgg(fig).draw()
    title = fig.subfigs[1]._suptitle.get_text()
    assert title.startswith("average pool attention") and "every map is the average pool's row" in title
