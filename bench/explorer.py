"""How big and how fast is the HTML attention explorer at real sizes? `python -m bench.explorer`.

    python -m bench.explorer                                        # ViT-B/16 at 224, DINOv2-S/14-reg4 at 518
    python -m bench.explorer --model deit_tiny_patch16_224 --image photo.jpg --screenshot imgs/explorer.png

Writes one page per configuration (`attention.explorer.explorer_html`, random weights unless --model names one:
sizes and timings do not depend on the weights) under --output, opens it in headless Chromium (selenium) and
prints: the file size; the time from opening the file to the first map drawn (performance.now() at the end of the
first render, from the navigation start: reading, parsing and decoding the data included); the time from a click on
a patch to the updated overlay and layer x head grid (the page's own clock, from the click event to the end of
drawing; median and max over --clicks clicks); rollout from a patch up to the last layer, the first time (the
head-mean matrices of every layer are computed then, once) and again for another patch; and the browser's version.
--screenshot PATH saves a PNG of the first page, the centre patch as the query in the middle layer.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import functional as TF

from attention.explorer import explorer_html
from imagenet.dataloaders import classes as IN
from models.pretrained import load_pretrained
from utils.config import build_parser
from utils.images import load_image

PROG = "python -m bench.explorer"
ROOT = Path(__file__).resolve().parents[1]
CHELSEA = "imgs/chelsea.jpg"  # relative to the repo root
CONFIG = {  # name -> (default, help); every entry is a flag (img_size -> --img-size)
    "sizes": ("vit_b16_224,dinov2_s14_reg4_518", "configurations, comma-separated, of " + ", ".join(
        ["vit_b16_224 (timm vit_base_patch16_224: 197 tokens, 12 x 12 heads)",
         "dinov2_s14_reg4_518 (timm vit_small_patch14_reg4_dinov2 at 518 px: 1,374 tokens, 12 x 6 heads)"])),
    "model": ("", "instead of --sizes: this model (a registry name, timm/<name>, a checkpoint), at --img-size"),
    "img_size": (224, "--model: the input size in pixels"),
    "image": (CHELSEA, "the photo shown (resized and center-cropped to the input size)"),
    "clicks": (10, "patch clicks timed per page"),
    "output": ("runs/bench/explorer", "folder for the pages"),
    "screenshot": ("", "save a PNG of the first page here (query: the centre patch, in the middle layer)"),
    "chromium": ("", "the browser (empty: chromium on the PATH)"),
    "chromedriver": ("", "its WebDriver (empty: chromedriver on the PATH)"),
}
SIZES = {"vit_b16_224": ("vit_base_patch16_224", 224, {}),
         "dinov2_s14_reg4_518": ("vit_small_patch14_reg4_dinov2", 518, {"num_classes": 0})}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1500,1100"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(name: str, cfg: dict) -> tuple[torch.nn.Module, int]:
    """A configuration's model (random weights) and input size, or --model's."""
    if name == "model":
        return load_pretrained(cfg["model"]).eval(), cfg["img_size"]
    import timm

    arch, size, kw = SIZES[name]
    torch.manual_seed(0)
    return load_pretrained(timm.create_model(arch, pretrained=False, img_size=size, **kw).eval()), size


def photo(path: str, size: int) -> tuple[torch.Tensor, np.ndarray]:
    img = TF.center_crop(TF.resize(load_image(path), size, interpolation=TF.InterpolationMode.BICUBIC), size)
    return TF.normalize(TF.to_tensor(img), MEAN, STD)[None], np.asarray(img)


def browser(cfg: dict, profile: Path):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    for f in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(f)
    options.binary_location = cfg["chromium"]
    return webdriver.Chrome(service=webdriver.ChromeService(cfg["chromedriver"]), options=options)


WAIT = ("const done = arguments[0]; const wait = () => document.getElementById('view').dataset.ready === '1' ? "
        "done(explorer.timings) : setTimeout(wait, 5); wait();")
ROLLOUT = ("const [q, done] = arguments; const t0 = performance.now(); "
           "explorer.set({mode: 'rollout', layer: explorer.data.images[0].layers - 1, query: q})"
           ".then(() => done(performance.now() - t0));")


def measure(driver, page: Path, clicks: int, rng: np.random.Generator, shot: str) -> dict:
    """Open the page, click patches, roll out twice -> timings in ms."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.set_script_timeout(1200)
    driver.get(page.resolve().as_uri())
    first = driver.execute_async_script(WAIT)["firstMap"]
    view = driver.find_element(By.ID, "view")
    w, h = view.size["width"], view.size["height"]
    driver.execute_script("explorer.set({layer: Math.floor(explorer.data.images[0].layers / 2), head: 0})")
    for _ in range(clicks):
        x, y = rng.integers(-w // 2 + 2, w // 2 - 2), rng.integers(-h // 2 + 2, h // 2 - 2)
        ActionChains(driver).move_to_element_with_offset(view, int(x), int(y)).click().perform()
        times = driver.execute_async_script(WAIT)
    click = times["clicks"][-clicks:]
    if shot:  # the centre patch as the query
        driver.execute_script("const d = explorer.data.images[0]; explorer.set({query: d.prefix + "
                              "Math.floor(d.grid[0] / 2) * d.grid[1] + Math.floor(d.grid[1] / 2)})")
        driver.execute_async_script(WAIT)
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(shot)
    tokens = driver.execute_script("return explorer.data.images[0].tokens")
    rollout = [driver.execute_async_script(ROLLOUT, int(q)) for q in (tokens - 1, tokens // 2)]
    return {"first": first, "click_median": statistics.median(click), "click_max": max(click),
            "rollout_first": rollout[0], "rollout_again": rollout[1],
            "on": driver.execute_script("return explorer.timings.rolloutOn"),
            "version": driver.capabilities.get("browserVersion", "?")}


def main(argv: list[str] | None = None) -> None:
    cfg = vars(build_parser(PROG, __doc__, {"options": CONFIG}).parse_args(argv))
    names = ["model"] if cfg["model"] else [s for s in cfg["sizes"].split(",") if s]
    unknown = [n for n in names if n not in SIZES and n != "model"]
    if unknown:
        sys.exit(f"error: --sizes {','.join(unknown)} is not one of {', '.join(SIZES)}.")
    for exe in ("chromium", "chromedriver"):
        cfg[exe] = cfg[exe] or shutil.which(exe) or ""
        if not Path(cfg[exe]).is_file():
            what = f"--{exe} '{cfg[exe]}' is not a file" if cfg[exe] else f"no {exe} on the PATH"
            sys.exit(f"error: {what}; install it (apt-get install chromium chromium-driver) or pass its path.")
    if cfg["image"] == CHELSEA and not Path(CHELSEA).exists():
        cfg["image"] = str(ROOT / CHELSEA)
    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    driver = browser(cfg, out / "profile")
    rng = np.random.default_rng(0)
    try:
        for i, name in enumerate(names):
            model, size = build(name, cfg)
            x, picture = photo(cfg["image"], size)
            t0 = time.perf_counter()
            names = list(IN.NAMES) if model.config["num_classes"] == IN.NUM_CLASSES else None
            page = explorer_html(model, x, out / f"{name}.html", pictures=[picture], titles=[Path(cfg["image"]).name],
                                 class_names=names)
            made = time.perf_counter() - t0
            r = measure(driver, page.path, cfg["clicks"], rng, cfg["screenshot"] if i == 0 else "")
            d = page.path.stat().st_size / 2 ** 20
            print(f"{name}: {size} px, {x.shape[-1] // model.patch_size} x {x.shape[-2] // model.patch_size} "
                  f"patches; written in {made:.1f} s; {d:.1f} MiB; stored attention within ±{page.max_error:.2g}")
            print(f"  open -> first map {r['first']:.0f} ms; click -> updated grid {r['click_median']:.0f} ms median, "
                  f"{r['click_max']:.0f} ms max ({cfg['clicks']} clicks); rollout to the last layer "
                  f"{r['rollout_first']:.0f} ms first (on {r['on']}), {r['rollout_again']:.0f} ms again")
        print(f"browser: Chromium {r['version']} (headless, {cfg['chromium']})")
        if cfg["screenshot"]:
            print(f"saved {cfg['screenshot']}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
