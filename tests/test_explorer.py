"""The HTML attention explorer: the data it stores equals the model's attention (our ViT with registers, a timm
register model), a real headless Chromium shows the same rows, columns and rollouts, the URL hash reproduces a
view, and bad input is one line with nothing written."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attention.explorer import ExplorerError, explorer_html, factorize, stored_attention
from models.vit import VisionTransformer
from utils.img2attn import gradient_rollout

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]


def small_vit(reg_tokens: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=2, num_layers=3, patch_size=8, num_channels=3,
                              num_patches=16, num_classes=7, reg_tokens=reg_tokens).eval()
    with torch.no_grad():  # sharper, less uniform attention than the init gives
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def page_data(html: str) -> dict:
    return json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1))


def decode(entry: dict) -> torch.Tensor:
    """The attention (L, heads, T, T) the page shows, from its stored int8 factors."""
    L, H, T, r = entry["layers"], entry["heads"], entry["tokens"], entry["rank"]

    def arr(key, dtype, shape):
        return torch.from_numpy(np.frombuffer(base64.b64decode(entry[key]), dtype=dtype).copy()).reshape(shape)
    q, k = arr("q", np.int8, (L, H, T, r)), arr("k", np.int8, (L, H, T, r))
    qs, ks = arr("qs", np.float32, (L, H, T)), arr("ks", np.float32, (L, H, T))
    shown, lse = stored_attention(q, qs, k, ks)
    torch.testing.assert_close(lse, arr("lse", np.float32, (L, H, T)))
    return shown


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    path = tmp_path_factory.mktemp("explorer") / "explore.html"
    page = explorer_html(model, x, path, titles=["first", "second"], class_names=[f"c{i}" for i in range(7)])
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
    return page, torch.stack(attn, 1).double(), path, model, x  # attention (B, L, heads, T, T)


# ------------------------------------------------------------------------------------------------------ Python side
def test_factorization_is_exact_before_quantisation():
    _, attn = small_vit()(torch.randn(1, 3, 32, 32), return_attn=True)
    q, k = factorize(attn[1][0].detach(), 32 // 2 + 1)
    torch.testing.assert_close((q @ k.mT).exp(), attn[1][0].double(), atol=1e-6, rtol=0)


def test_stored_data_equals_the_models_attention(written):
    page, attn, path, model, x = written
    data = page_data(path.read_text())
    assert path.read_text() == page.html and len(data["images"]) == 2
    assert page._repr_html_().startswith("<iframe srcdoc=")  # Jupyter shows the page inline
    for b, entry in enumerate(data["images"]):
        assert (entry["tokens"], entry["prefix"], entry["grid"]) == (19, 3, [4, 4])
        err = (decode(entry) - attn[b]).abs().max().item()
        assert err == pytest.approx(entry["max_error"], rel=1e-5) and err < 0.02
        assert len(entry["top"]) == 5 and entry["prefix_names"] == ["class token", "register 1", "register 2"]
        for t in entry["top"]:
            stored = torch.from_numpy(np.frombuffer(base64.b64decode(t["map"]), np.float32).reshape(4, 4).copy())
            torch.testing.assert_close(stored, gradient_rollout(model, x[b:b + 1], t["index"])[0])


def test_timm_register_model_is_stored_to_int8_precision(tmp_path):
    timm = pytest.importorskip("timm")
    from models.pretrained import load_pretrained

    torch.manual_seed(0)
    model = load_pretrained(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2,
                                              embed_dim=64, num_heads=2, num_classes=3).eval())
    x = torch.randn(1, 3, 28, 28)
    page = explorer_html(model, x, tmp_path / "reg.html")
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
    entry = page_data(page.html)["images"][0]
    assert entry["prefix"] == 5 and entry["prefix_names"] == ["class token"] + [f"register {i}" for i in range(1, 5)]
    assert (decode(entry) - torch.cat(attn).double()).abs().max() < 0.02


def tiny_timm(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    from models.pretrained import load_pretrained

    torch.manual_seed(0)
    return load_pretrained(timm.create_model(name, pretrained=False, img_size=32, depth=2, embed_dim=32, num_heads=2,
                                             num_classes=3, **kwargs).eval())


def test_distilled_deit_has_a_distillation_token_not_a_register():
    model = tiny_timm("deit_tiny_distilled_patch16_224")  # timm's dist_token after the class token
    x = torch.randn(1, 3, 32, 32)
    entry = page_data(explorer_html(model, x, None).html)["images"][0]
    assert entry["prefix"] == 2 and entry["prefix_names"] == ["class token", "distillation token"]
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
    assert (decode(entry) - torch.cat(attn).double()).abs().max() < 0.02


@pytest.mark.parametrize("name,kwargs,names", [
    ("vit_small_patch16_224", dict(global_pool="avg", class_token=False, reg_tokens=2),  # GAP: no class token
     ["average pool", "register 1", "register 2"]),
    ("vit_small_patch16_224", dict(global_pool="avg"), ["average pool", "class token"]),  # GAP beside a class token
    ("vit_base_patch16_siglip_224", {}, ["pool query"]),  # SigLIP's attention pool, no class token
])
def test_pooling_models_name_their_pool_query_and_no_class_token_they_lack(name, kwargs, names):
    entry = page_data(explorer_html(tiny_timm(name, **kwargs), torch.randn(1, 3, 32, 32), None).html)["images"][0]
    assert entry["prefix"] == len(names) and entry["prefix_names"] == names


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path):
    path = tmp_path / "out.html"
    with pytest.raises(ExplorerError, match="not a multiple of patch_size"):
        explorer_html(small_vit(), torch.randn(1, 3, 30, 30), path)
    with pytest.raises(ExplorerError, match="no attention maps"):
        explorer_html(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 32, 32), path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ExplorerError, match="which is a file, not a folder"):
        explorer_html(small_vit(), torch.randn(1, 3, 32, 32), tmp_path / "file" / "out.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_bad_path_is_one_line_exit_nonzero(tmp_path):
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "imagenet.vis_attn", "--html", str(tmp_path / "file" / "x.html")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "not a folder" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------------------------------- browser side
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("no chromium / chromedriver installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for f in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(f)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def open_page(driver, path: Path, hash_: str = "") -> None:
    driver.get(path.as_uri() + hash_)
    driver.execute_async_script("const done = arguments[0]; const wait = () => "
                                "document.getElementById('view').dataset.ready === '1' ? done() : setTimeout(wait, 10);"
                                " wait();")


def shown(driver) -> dict:
    return driver.execute_async_script("const done = arguments[0]; const wait = () => "
                                       "document.getElementById('view').dataset.ready === '1' ? done(explorer.shown())"
                                       " : setTimeout(wait, 10); wait();")


def click_patch(driver, i: int, j: int, grid=(4, 4)) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    view = driver.find_element(By.ID, "view")
    w, h = view.size["width"], view.size["height"]
    ActionChains(driver).move_to_element_with_offset(view, int((j + 0.5) * w / grid[1] - w / 2),
                                                     int((i + 0.5) * h / grid[0] - h / 2)).click().perform()


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def rollout_row(attn: torch.Tensor, layer: int, query: int) -> torch.Tensor:
    """Row `query` of Â_layer ... Â_0, Â = (mean over heads + I) / 2 (utils.img2attn.attention_rollout's rule)."""
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype)
    v = eye[query]
    for a in reversed(attn[:layer + 1]):
        v = v @ ((a.mean(0) + eye) / 2)
    return v


def test_browser_shows_the_models_rows_columns_and_rollouts(written, browser, tmp_path):
    page, attn, path, *_ = written
    P, tol = 3, page.max_error + 1e-5
    open_page(browser, path)
    choose(browser, "layer", "1")
    choose(browser, "head", "1")
    click_patch(browser, 2, 1)
    view = shown(browser)
    q = P + 2 * 4 + 1
    assert (view["layer"], view["head"], view["query"], view["mode"]) == (1, 1, q, "row")
    np.testing.assert_allclose(view["values"], attn[0, 1, 1, q, P:], atol=tol, rtol=0)
    choose(browser, "mode", "column")
    np.testing.assert_allclose(shown(browser)["values"], attn[0, 1, 1, P:, q], atol=tol, rtol=0)
    choose(browser, "head", "2")  # the mean over heads
    np.testing.assert_allclose(shown(browser)["values"], attn[0, 1, :, P:, q].mean(0), atol=tol, rtol=0)
    choose(browser, "layer", "2")
    choose(browser, "mode", "rollout")
    np.testing.assert_allclose(shown(browser)["values"], rollout_row(attn[0], 2, q)[P:], atol=3 * tol, rtol=0)
    choose(browser, "mode", "grad:0")
    assert len(shown(browser)["values"]) == 16
    browser.save_screenshot(str(tmp_path / "explorer.png"))
    assert (tmp_path / "explorer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_url_hash_reproduces_a_view_and_grid_and_table_select(written, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page, attn, path, *_ = written
    open_page(browser, path, "#image=1&mode=row&layer=2&head=0&query=1")
    view = shown(browser)
    assert (view["image"], view["layer"], view["head"], view["query"]) == (1, 2, 0, 1)
    chips = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#chips button")]
    assert chips == ["class token", "register 1", "register 2"]  # the prefix tokens, by the model's names
    np.testing.assert_allclose(view["values"], attn[1, 2, 0, 1, 3:], atol=page.max_error + 1e-5, rtol=0)
    assert browser.execute_script("return location.hash") == "#image=1&mode=row&layer=2&head=0&query=1"
    grid = browser.find_element(By.ID, "grid")  # 3 layers (rows) x 2 heads + the mean (columns): layer 0, head 1
    w, h = grid.size["width"], grid.size["height"]
    ActionChains(browser).move_to_element_with_offset(grid, int(1.5 * w / 3 - w / 2),
                                                      int(0.5 * h / 3 - h / 2)).click().perform()
    assert (shown(browser)["layer"], shown(browser)["head"]) == (0, 1)
    browser.find_element(By.CSS_SELECTOR, '#stats tbody tr[data-layer="2"][data-head="1"]').click()
    assert (shown(browser)["layer"], shown(browser)["head"]) == (2, 1)
    assert "layer=2&head=1" in browser.execute_script("return location.hash")
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_mnist_cli_writes_several_test_digits(tmp_path):
    shared = REPO.parent / "shared" / "data"
    if not (shared / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("no MNIST in ../shared/data")
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=2, num_layers=2, patch_size=7, num_channels=1,
                              num_patches=16, num_classes=10)
    torch.save({"model_config": dict(model.config), "model": model.state_dict(), "epoch": 0}, tmp_path / "m.pth")
    argv = [sys.executable, "-m", "mnist.vis_attn", "--model", str(tmp_path / "m.pth"), "--data-root", str(shared),
            "--index", "0", "1", "2", "3"]
    done = subprocess.run([*argv, "--html", str(tmp_path / "e.html")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    data = page_data((tmp_path / "e.html").read_text())
    assert [d["title"] for d in data["images"]] == [f"test digit {i}" for i in range(4)]
    assert all(d["grid"] == [4, 4] and len(d["top"]) == 5 for d in data["images"])
    figure = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)  # the figure: one digit
    assert figure.returncode != 0 and "--html" in figure.stderr and figure.stderr.count("\n") == 1


def test_imagenet_cli_writes_the_page_of_a_photo(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=2, num_layers=2, patch_size=8, num_channels=3,
                              num_patches=16, num_classes=10)
    torch.save({"model_config": dict(model.config), "model": model.state_dict(), "epoch": 0}, tmp_path / "m.pth")
    done = subprocess.run([sys.executable, "-m", "imagenet.vis_attn", "--model", str(tmp_path / "m.pth"),
                           "--img-size", "32", "--html", str(tmp_path / "e.html")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "saved" in done.stdout and "1." in done.stdout  # the top-5 as before
    entry = page_data((tmp_path / "e.html").read_text())["images"][0]
    assert entry["title"] == "chelsea.jpg" and entry["grid"] == [4, 6] and len(entry["top"]) == 5  # 32 x 48 px


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "out.html"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("attention.explorer.os.replace", refuse)
    with pytest.raises(OSError, match="No space"):
        explorer_html(small_vit(), torch.randn(1, 3, 32, 32), path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.html"]
