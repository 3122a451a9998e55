"""The web console in a real browser: Playwright driving Debian's Chromium (headless) against a real uvicorn server.
A person's path — sign in, predict a PNG and see the label and the heatmap, promote a version with an admin key and
see its stage change, watch the monitor's request count rise — and a hostile model card that stays inert. Every
page is also checked for Content-Security-Policy violations, labelled fields, keyboard reach and a tablet width.
Screenshots go to ``test-artifacts/console/`` (``$LEPTON_ARTIFACTS`` overrides)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import httpx
import pytest

from conftest import auth, png_bytes, running

CHROMIUM = os.environ.get("LEPTON_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("LEPTON_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")) / "console"
#: Chromium's flags as root in a container, on a machine with no way out (no background calls home).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):  # .ci/run installs it: a missing browser in CI is a failure, not a skip
        raise RuntimeError(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
    pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright; when they cannot talk (a Playwright release too far from the installed
    Chromium), one clear failure naming both versions."""
    import subprocess
    from importlib.metadata import version

    playwright_version = version("playwright")

    chromium_version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60).stdout
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS, timeout=60_000)
        except Exception as exc:
            pytest.fail(f"Playwright {playwright_version} could not start {chromium_version.strip()} at {CHROMIUM}: "
                        f"{str(exc)[:400]}\nPin a Playwright release close to this Chromium in pyproject.toml.")
        yield browser
        browser.close()


def test_smoke_playwright_drives_this_chromium(browser):
    page = browser.new_page()
    page.set_content("<button id=b>ok</button>")
    page.click("#b")
    assert page.evaluate("navigator.userAgent").find("Chrome/") > 0
    page.close()


@pytest.fixture(scope="module")
def site(tiny_run, tmp_path_factory):
    from lepton.serve import ServeConfig
    from test_serve_ui import SERVED, console_registry

    made = console_registry(tiny_run, tmp_path_factory.mktemp("browser"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running(ServeConfig(models=SERVED, registry=made["registry"], rate_limit=0)) as base:
        yield {**made, "url": base}


class Watch:
    """A page's console errors, CSP violations and JavaScript dialogs (an alert() would be an XSS)."""

    def __init__(self, page):
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))


def _page(browser, site, key: str, width: int = 1280, height: int = 800):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    watch = Watch(page)
    page.goto(site["url"] + "/ui/")
    page.get_by_label("API key").fill(site["keys"][key])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/predict")
    return page, watch


def _until(page, expression: str, timeout: float = 20.0) -> None:
    """Wait until a JavaScript expression is true, polling from here: Playwright's own ``wait_for_function`` polls
    with ``eval`` inside the page, which the console's Content-Security-Policy (rightly) refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout:.0f} s: {expression}"
        time.sleep(0.05)


def _labelled(page) -> None:
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select')]
        .filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.id || e.name)""")
    assert unlabeled == []


def test_sign_in_and_predict_a_png(browser, site, tmp_path):
    page, watch = _page(browser, site, "clinic")
    assert "Research use only" in page.locator(".notice").inner_text()
    assert page.locator("#who").inner_text() == "tenant clinic · predict"
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(3, size=48))
    other = tmp_path / "second.png"
    other.write_bytes(png_bytes(4, size=48))
    page.set_input_files("#files", [str(image), str(other)])
    rows = page.locator("#results tbody tr")
    rows.nth(1).locator("td").nth(4).wait_for(state="attached")
    _until(page, "document.querySelectorAll('#results tbody tr td:nth-child(5)')[1]?.textContent === '1'")
    first = rows.nth(0).locator("td")
    assert first.nth(1).inner_text() in ("normal", "opacity")  # the synthetic data's classes
    assert "normal 0." in first.nth(2).inner_text() and "opacity 0." in first.nth(2).inner_text()
    # The heatmap over the model's input, its opacity set by the slider.
    heat = page.locator("#overlay-heat")
    _until(page, "document.getElementById('overlay-heat').naturalWidth > 0")
    _until(page, "document.getElementById('view-image').naturalWidth > 0")
    page.locator("#opacity").fill("20")
    assert heat.evaluate("e => e.style.opacity") == "0.2"
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "predict.png"), full_page=True)
    # Keyboard: on a fresh page the skip link, then the navigation, are the first stops.
    page.goto(site["url"] + "/ui/predict")
    page.wait_for_selector("#model option", state="attached")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Predict"
    assert watch.problems == []


def test_a_volume_scrolls_through_its_slices_under_a_window(browser, site, tmp_path):
    from test_serve_ui import ct_zip

    archive = tmp_path / "ct.zip"
    archive.write_bytes(ct_zip(tmp_path / "ct", slices=5))
    page, watch = _page(browser, site, "clinic")
    page.select_option("#method", "")
    page.set_input_files("#files", str(archive))
    _until(page, "document.getElementById('slice').max === '4'")
    first = page.locator("#view-image").get_attribute("src")
    page.locator("#slice").fill("0")
    assert page.locator("#slice-out").inner_text() == "1 / 5"
    assert page.locator("#view-image").get_attribute("src") != first
    before = page.locator("#view-image").get_attribute("src")
    page.select_option("#window", "bone")
    _until(page, f"document.getElementById('view-image').src !== {before!r}")
    page.screenshot(path=str(ARTIFACTS / "predict-volume.png"), full_page=True)
    assert watch.problems == [], watch.problems


def test_promote_with_an_admin_key_and_see_the_stage_change(browser, site):
    page, watch = _page(browser, site, "clinic")
    page.goto(site["url"] + "/ui/models")
    page.wait_for_selector("#versions tbody tr")
    assert page.locator("#versions button").first.is_visible() is False  # a predict key gets no admin buttons
    page.context.close()

    page, watch = _page(browser, site, "admin")
    page.goto(site["url"] + "/ui/models")
    page.wait_for_selector("#versions tbody tr[data-version='2']")
    row = page.locator("#versions tbody tr[data-version='2']")
    assert row.locator(".stage").inner_text() != "production"
    row.get_by_role("button", name="Promote to production").click()
    dialog = page.locator("#confirm")
    assert dialog.is_visible() and "version 2 to production" in page.locator("#confirm-text").inner_text()
    page.locator("#confirm-cancel").click()  # cancelled: nothing changes
    assert row.locator(".stage").inner_text() != "production"
    row.get_by_role("button", name="Promote to production").click()
    page.locator("#confirm-ok").click()
    _until(page, "document.querySelector(\"tr[data-version='2'] .stage\").textContent === 'production'")
    assert "serving version 2" in page.locator("#summary").inner_text()
    assert page.locator("tr[data-version='1'] .stage").inner_text() == "archived"
    # Compare two versions: same run, so only what the registry records apart differs; the data is the same.
    page.select_option("#diff-a", "1")
    page.select_option("#diff-b", "3")
    page.get_by_role("button", name="Compare").click()
    _until(page, "document.querySelector('#diff tbody')?.textContent.includes('training data')")
    assert "same" in page.locator("#diff tbody tr").last.inner_text()
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)
    assert watch.problems == [], watch.problems


def test_a_hostile_model_card_stays_inert(browser, site):
    page, watch = _page(browser, site, "admin")
    page.goto(site["url"] + "/ui/models")
    page.wait_for_selector("#card-version option[value='2']", state="attached")
    page.select_option("#card-version", "2")
    _until(page, "document.getElementById('card').textContent.includes('alert(1)')")
    card = page.locator("#card")
    assert "<script>alert(1)</script>" in card.inner_text()  # shown as text
    assert card.locator("script, img, [onerror], [onclick]").count() == 0
    assert all(not (a.get_attribute("href") or "").startswith("javascript") for a in card.locator("a").all())
    page.wait_for_timeout(500)
    assert watch.problems == [], watch.problems  # no alert() ran, no CSP report


def test_the_monitor_request_count_rises(browser, site):
    page, watch = _page(browser, site, "clinic")
    page.goto(site["url"] + "/ui/monitor")
    _until(page, "/^\\d+$/.test(document.getElementById('requests-total').textContent)")
    before = int(page.locator("#requests-total").inner_text())
    for seed in range(4):
        r = httpx.post(site["url"] + "/v1/models/cxr/predict", content=png_bytes(seed),
                       headers=auth(site["keys"]["clinic"]), timeout=30)
        assert r.status_code == 200
    _until(page, f"Number(document.getElementById('requests-total').textContent) >= {before + 4}", timeout=15)
    assert page.locator("#charts figure").count() == 6
    assert page.locator("#classes tbody tr").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)
    assert watch.problems == [], watch.problems


@pytest.mark.parametrize("path", ["/ui/predict", "/ui/models", "/ui/monitor"])
def test_pages_fit_a_tablet(browser, site, path):
    page, watch = _page(browser, site, "admin", width=768, height=1024)
    page.goto(site["url"] + path)
    page.wait_for_load_state("networkidle")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert page.locator(".notice").is_visible()
    page.screenshot(path=str(ARTIFACTS / f"tablet-{path.rsplit('/', 1)[1]}.png"), full_page=True)
    assert watch.problems == [], watch.problems


@pytest.mark.slow
def test_route_change_and_rollback_by_clicking(browser, site):
    """An admin promotes version 3, rolls back to the previous production version, then routes traffic with a
    shadow version: every change by clicking and confirming, each checked against the server's own answer."""
    key = auth(site["keys"]["admin"])
    before = httpx.get(site["url"] + "/v1/models/cxr", headers=key, timeout=30).json()["version"]
    page, watch = _page(browser, site, "admin")
    page.goto(site["url"] + "/ui/models")
    page.wait_for_selector("#versions tbody tr[data-version='3']")
    if before != 3:
        page.locator("#versions tbody tr[data-version='3']").get_by_role("button", name="Promote to production").click()
        page.locator("#confirm-ok").click()
        _until(page, "document.getElementById('summary').textContent.includes('serving version 3')")
    previous = before if before != 3 else None
    page.get_by_role("button", name="Roll back production").click()
    assert "previous production version" in page.locator("#confirm-text").inner_text()
    page.locator("#confirm-ok").click()
    _until(page, "!document.getElementById('summary').textContent.includes('serving version 3')")
    served = httpx.get(site["url"] + "/v1/models/cxr", headers=key, timeout=30).json()
    assert served["version"] != 3 and (previous is None or served["version"] == previous)
    assert page.locator("tr[data-version='3'] .stage").inner_text() != "production"
    page.get_by_label("Weights (version=weight, comma-separated)").fill("1=80, 3=20")
    page.get_by_label("Shadow version").fill("2")
    page.get_by_role("button", name="Set route").click()
    assert '{"1":80,"3":20}' in page.locator("#confirm-text").inner_text()
    page.locator("#confirm-ok").click()
    _until(page, "document.getElementById('route-now').textContent.includes('shadow: version 2')")
    assert "version 1: 80 %" in page.locator("#route-now").inner_text()
    routed = httpx.get(site["url"] + "/v1/models/cxr", headers=key, timeout=30).json()
    assert routed["route"] == {"1": 80.0, "3": 20.0} and routed["shadow"] == 2
    page.screenshot(path=str(ARTIFACTS / "models-route.png"), full_page=True)
    # back to one version, so the other tests see the registry as they expect
    page.get_by_label("Weights (version=weight, comma-separated)").fill(f"{served['version']}=1")
    page.get_by_label("Shadow version").fill("")
    page.get_by_role("button", name="Set route").click()
    page.locator("#confirm-ok").click()
    _until(page, "!document.getElementById('route-now').textContent.includes('shadow')")
    assert watch.problems == [], watch.problems


@contextlib.contextmanager
def _served(run_path, name: str, root):
    """A run registered as ``name`` in a registry under ``root`` and served: yields the base URL and an admin key."""
    from lepton.registry import Registry
    from lepton.serve import ServeConfig

    reg = Registry.open(root / "reg")
    reg.register_run(run_path, name)
    keys = {"admin": reg.create_key("ops", "admin")}
    with running(ServeConfig(models=[name], registry=str(root / "reg"), rate_limit=0)) as base:
        yield base, keys


@pytest.fixture(scope="module")
def seg_site(seg_run, tmp_path_factory):
    """A served 2-D segmentation model (``seg_run``)."""

    run, cases = seg_run
    root = tmp_path_factory.mktemp("seg-console")
    with _served(run.path, "lungseg", root) as (base, keys):
        yield {"url": base, "keys": keys, "cases": cases}


@pytest.mark.slow
def test_a_segmentation_mask_over_the_image_with_class_toggles_and_opacity(browser, seg_site):
    import base64
    import io

    import numpy as np
    from PIL import Image

    images = sorted((seg_site["cases"] / "images").iterdir())
    key = auth(seg_site["keys"]["admin"])
    chosen, expected = None, 0
    for path in images:  # an image the model finds opacity in
        r = httpx.post(seg_site["url"] + "/v1/models/lungseg/predict", content=path.read_bytes(), headers=key,
                       timeout=60)
        assert r.status_code == 200, r.text
        label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["label_map"]["data"]))))
        if (label_map == 1).sum() > 0:
            chosen, expected = path, int((label_map == 1).sum())
            break
    assert chosen is not None, "the model found no opacity in any training image"
    page, watch = _page(browser, seg_site, "admin")
    page.set_input_files("#files", str(chosen))
    _until(page, "document.getElementById('mask-canvas').dataset.painted !== undefined")
    assert "lesion" in page.locator("#results tbody tr td").nth(1).inner_text()
    assert int(page.locator("#mask-canvas").get_attribute("data-painted")) == expected
    _until(page, "document.getElementById('mask-base').naturalWidth > 0")
    size = page.evaluate("[document.getElementById('mask-canvas').width, document.getElementById('mask-base')"
                         ".naturalWidth]")
    assert size[0] == size[1]  # the map on the image's own grid
    toggle = page.get_by_label("opacity", exact=False).and_(page.locator("input[type=checkbox]"))
    toggle.uncheck()
    assert page.locator("#mask-canvas").get_attribute("data-painted") == "0"
    toggle.check()
    assert int(page.locator("#mask-canvas").get_attribute("data-painted")) == expected
    page.locator("#mask-opacity").fill("30")
    assert page.locator("#mask-canvas").evaluate("e => e.style.opacity") == "0.3"
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "predict-segmentation.png"), full_page=True)
    assert watch.problems == [], watch.problems


@pytest.fixture(scope="module")
def seg3d_site(tmp_path_factory):
    """A served 3-D segmentation model (a Decathlon folder of CT phantoms, one short epoch) and its cases."""
    import lepton
    from lepton.data.tools.synthetic import write_segmentation_cases

    root = tmp_path_factory.mktemp("seg3d-console")
    cases = write_segmentation_cases(root / "Task01", n=6, dims=3, seed=0)
    run = lepton.train(cases, task="segmentation", epochs=1, batch_size=2, time_budget_s=0, quiet=True,
                       output_dir=str(root / "runs"), name="seg3d", seed=0)
    with _served(run.path, "nodules", root) as (base, keys):
        yield {"url": base, "keys": keys, "cases": cases}


@pytest.mark.slow
def test_a_volume_mask_follows_the_slice_slider_and_keys(browser, seg3d_site):
    """A 3-D segmentation's label map (NIfTI) drawn slice by slice: the painted voxels of each slice the slider or
    the arrow keys reach match the served map's slice; class toggle and opacity work as in 2-D."""
    import base64
    import gzip

    import nibabel as nib
    import numpy as np

    case = sorted((seg3d_site["cases"] / "imagesTr").iterdir())[0]
    r = httpx.post(seg3d_site["url"] + "/v1/models/nodules/predict", files={"file": (case.name, case.read_bytes())},
                   headers=auth(seg3d_site["keys"]["admin"]), timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["label_map"]["format"] == "nifti"
    raw = gzip.decompress(base64.b64decode(r.json()["label_map"]["data"]))
    labels = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)  # (D, H, W): the viewer's slices along D
    per_slice = [int((labels[d] == 1).sum()) for d in range(labels.shape[0])]
    assert max(per_slice) > 0, "the model found no nodule voxel in the case"
    page, watch = _page(browser, seg3d_site, "admin")
    page.set_input_files("#files", str(case))
    _until(page, f"document.getElementById('slice').max === '{labels.shape[0] - 1}'", timeout=90)  # a 3-D answer
    _until(page, "document.getElementById('mask-canvas').dataset.slice !== undefined")
    assert "lesion" in page.locator("#results tbody tr td").nth(1).inner_text()

    def painted() -> int:
        return int(page.locator("#mask-canvas").get_attribute("data-painted"))

    start = int(page.locator("#mask-canvas").get_attribute("data-slice"))
    assert start == int(page.locator("#slice").input_value()) and painted() == per_slice[start]
    d = int(np.argmax(per_slice))
    page.locator("#slice").fill(str(d))
    assert page.locator("#mask-canvas").get_attribute("data-slice") == str(d) and painted() == per_slice[d]
    assert page.locator("#slice-out").inner_text() == f"{d + 1} / {labels.shape[0]}"
    step = -1 if d == labels.shape[0] - 1 else 1
    page.locator("#slice").press("ArrowLeft" if step < 0 else "ArrowRight")
    assert page.locator("#mask-canvas").get_attribute("data-slice") == str(d + step)
    assert painted() == per_slice[d + step]
    size = page.evaluate("[document.getElementById('mask-canvas').width, document.getElementById('mask-canvas')"
                         ".height]")
    assert size == [labels.shape[2], labels.shape[1]]  # columns W, rows H: the viewer's slice
    _until(page, f"document.getElementById('mask-base').naturalWidth === {labels.shape[2]}")
    toggle = page.get_by_label("nodule", exact=False).and_(page.locator("input[type=checkbox]"))
    toggle.uncheck()
    assert painted() == 0
    toggle.check()
    assert painted() == per_slice[d + step]
    page.locator("#mask-opacity").fill("40")
    assert page.locator("#mask-canvas").evaluate("e => e.style.opacity") == "0.4"
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "predict-segmentation-volume.png"), full_page=True)
    assert watch.problems == [], watch.problems


@pytest.fixture(scope="module")
def slide_site(tmp_path_factory):
    """A server with one slide model (and no image model) and a generated slide."""
    from lepton.data.tools.slidegen import plan_slide, write_slide
    from lepton.registry import Registry
    from lepton.serve import ServeConfig
    from test_serve_slides import _slide_model

    root = tmp_path_factory.mktemp("slide-console")
    reg = Registry.open(root / "reg")
    reg.register_slide_model(_slide_model(root / "model"), "wsi")
    keys = {"admin": reg.create_key("ops", "admin")}
    slide = write_slide(root / "case.tiff", plan_slide(1024, 896, tumour=True, seed=5), tile=128)
    config = ServeConfig(models=["wsi"], registry=str(root / "reg"), rate_limit=0, slide_dir=str(root / "jobs"))
    with running(config) as base:
        yield {"url": base, "keys": keys, "slide": slide}


@pytest.mark.slow
def test_a_slide_job_shows_the_heatmap_over_the_thumbnail_and_the_probability(browser, slide_site):
    page, watch = _page(browser, slide_site, "admin")
    page.get_by_role("link", name="Models").click()  # listed like an image model, its format, stage, card
    page.wait_for_url("**/ui/models")
    _until(page, "document.getElementById('card').textContent.includes('gated-attention MIL')")
    assert "wsi: slide model (slide-mil" in page.locator("#summary").inner_text()
    assert page.locator("#versions tbody tr td").all_inner_texts()[:3] == ["1 (served)", "none", "slide-mil"]
    assert page.locator("#route-form").is_hidden() and page.locator("#diff-form").is_hidden()
    page.get_by_role("link", name="Run it on a whole slide on the Slides page").click()
    page.wait_for_url("**/ui/slides?model=wsi")
    page.wait_for_selector("#slide-model option", state="attached")
    _until(page, "document.getElementById('slide-card').textContent.includes('gated-attention MIL')")
    page.set_input_files("#slide-file", str(slide_site["slide"]))
    _until(page, "document.getElementById('job-heatmap').naturalWidth > 0", timeout=60)
    assert "done" in page.locator("#job-status").inner_text()
    probability = page.locator("#job-probability").inner_text()
    assert probability.startswith("P(tumour) = 0.") or probability == "P(tumour) = 1.000"
    assert page.locator("#job-label").inner_text() in ("normal", "tumour")
    assert page.evaluate("document.getElementById('job-progress').value") == page.evaluate(
        "document.getElementById('job-progress').max") > 1
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "slides.png"), full_page=True)
    assert watch.problems == [], watch.problems


@pytest.fixture(scope="module")
def det_site(tmp_path_factory):
    """A served 2-D detector (one short epoch on generated radiographs), every box answered (threshold 0)."""
    import json

    import lepton
    from lepton.data.tools.synthetic import write_detection_cases

    root = tmp_path_factory.mktemp("det-console")
    boxes = write_detection_cases(root / "cxr", 12, dims=2, seed=0)
    run = lepton.train(boxes, epochs=1, batch_size=6, time_budget_s=0, image_size=32, tta=False, quiet=True,
                       output_dir=str(root / "runs"), name="det", seed=0)
    info = json.loads((run.path / "run.json").read_text())
    (run.path / "run.json").write_text(json.dumps({**info, "threshold": 0.0}))  # an untrained model's boxes too
    with _served(run.path, "boxes", root) as (base, keys):
        yield {"url": base, "keys": keys, "images": sorted((root / "cxr" / "images").iterdir())}


@pytest.mark.slow
def test_boxes_drawn_over_the_image_with_labels_and_scores(browser, det_site):
    import json

    import numpy as np

    image = det_site["images"][0]
    r = httpx.post(det_site["url"] + "/v1/models/boxes/predict", content=image.read_bytes(),
                   headers=auth(det_site["keys"]["admin"]), timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()["boxes"]
    assert served, "no box at threshold 0"
    page, watch = _page(browser, det_site, "admin")
    page.set_input_files("#files", str(image))
    _until(page, "document.getElementById('boxes-canvas').dataset.boxes !== undefined")
    assert page.locator("#results tbody tr td").nth(1).inner_text() == f"{len(served)} box(es)"
    assert f"{served[0]['label']} " in page.locator("#results tbody tr td").nth(2).inner_text()
    size = 64  # the generated radiographs' side
    drawn = json.loads(page.locator("#boxes-canvas").get_attribute("data-boxes"))
    expected = [[round(b["box"][k] * size, 2) for k in ("x0", "y0", "x1", "y1")] for b in served]
    np.testing.assert_allclose(drawn, expected, atol=0.011)
    scale = int(page.locator("#boxes-canvas").get_attribute("data-scale"))
    x, y = int(expected[0][0] * scale), int((expected[0][1] + expected[0][3]) / 2 * scale)  # the left edge
    alpha = page.evaluate(f"document.getElementById('boxes-canvas').getContext('2d').getImageData({x}, {y}, 1, 1)"
                          ".data[3]")
    assert alpha > 0
    _labelled(page)
    page.screenshot(path=str(ARTIFACTS / "predict-boxes.png"), full_page=True)
    assert watch.problems == [], watch.problems
