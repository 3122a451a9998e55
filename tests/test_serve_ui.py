"""The web console's server side on a real uvicorn server: pages and their security headers, the JSON endpoints the
console uses (whoami, card, diff, view, monitor) and the admin actions (promote, roll back, route), each refused
without an admin key. The browser itself: tests/test_console_browser.py."""

from __future__ import annotations

import io
import re
import shutil
import zipfile
from pathlib import Path

import httpx
import pytest

from conftest import auth, png_bytes, running

XSS_CARD = ('# Card\n\n<script>alert(1)</script>\n\n<img src=x onerror="alert(2)">\n\n'
            '[click](javascript:alert(3)) and <a href="#" onclick="alert(4)">raw</a>\n\n'
            '| a | b |\n|---|---|\n| 1 | 2 |\n')


def ct_zip(folder: Path, slices: int = 6, size: int = 32) -> bytes:
    """A synthetic CT series (DICOM, Hounsfield units) zipped, as a person uploads a series."""
    import numpy as np

    from lepton.data.tools.synthetic import ct_phantom, write_dicom_series

    files = write_dicom_series(folder, ct_phantom(np.random.default_rng(0), (slices, size, size)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in files:
            zf.write(f, f.name)
    return buf.getvalue()


SERVED = ["cxr@production", "solo@production"]


def console_registry(tiny_run, root: Path) -> dict:
    """cxr v1 (production), v2 (with a hostile model card) and v3 for tenant clinic, solo v1 (production) for
    everyone; keys for clinic and an admin."""
    from lepton.evaluate import evaluate
    from lepton.registry import Registry

    run = root / "run"
    shutil.copytree(tiny_run.path, run)
    evaluate(run, split="test", n_bootstrap=20, plots=False)
    reg = Registry.open(root / "reg")
    for _ in range(3):
        reg.register_run(run, "cxr")
    reg.promote("cxr", 1, "production")
    reg.set_tenant("cxr", "clinic")
    reg.set_card("cxr@2", XSS_CARD)
    reg.register_run(run, "solo")  # one production version: nothing to roll back to
    reg.promote("solo", 1, "production")
    keys = {"clinic": reg.create_key("clinic"), "admin": reg.create_key("ops", "admin")}
    return {"registry": str(root / "reg"), "keys": keys}


@pytest.fixture(scope="module")
def console(tiny_run, tmp_path_factory):
    from lepton.serve import ServeConfig

    made = console_registry(tiny_run, tmp_path_factory.mktemp("console"))
    with running(ServeConfig(models=SERVED, registry=made["registry"], rate_limit=0)) as base:
        yield {**made, "url": base}


def _get(console, path: str, key: str | None = "clinic", **kw) -> httpx.Response:
    headers = auth(console["keys"][key]) if key else {}
    return httpx.get(console["url"] + path, headers=headers, timeout=30, **kw)


def _post(console, path: str, key: str | None = "clinic", **kw) -> httpx.Response:
    headers = {**(auth(console["keys"][key]) if key else {}), **kw.pop("headers", {})}
    return httpx.post(console["url"] + path, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("page", ["/ui/", "/ui/predict", "/ui/models", "/ui/monitor", "/ui/slides"])
def test_pages_are_local_strict_and_carry_the_notice(console, page):
    r = _get(console, page, key=None)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp and r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    html = r.text
    assert "Research use only — not for diagnosis" in html
    # No inline script, style or handler; every asset from this server.
    assert all(src for src in re.findall(r"<script([^>]*)>", html) if "src=" in src)
    assert not re.search(r"<script(?![^>]*src=)[^>]*>", html)
    assert not re.search(r"\son[a-z]+\s*=", html) and "style=" not in html and "<style" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    # Every form field has a label.
    ids = set(re.findall(r'<label for="([^"]+)"', html))
    assert set(re.findall(r'<(?:input|select)[^>]*id="([^"]+)"', html)) <= ids


def test_static_files_and_no_way_out_of_the_folder(console):
    for name in ("console.js", "predict.js", "models.js", "monitor.js", "signin.js", "console.css"):
        r = _get(console, f"/ui/static/{name}", key=None)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", r.text), name  # nothing from elsewhere
        assert "innerHTML" not in r.text or name == "models.js"  # only the server-rendered card
    for bad in ("../routers/ui.py", "..%2Frouters%2Fui.py", "nothere.js", ".hidden.js", "layout.html"):
        assert _get(console, f"/ui/static/{bad}", key=None).status_code == 404
    assert _get(console, "/ui/nothere", key=None).status_code == 404


def test_the_notice_can_be_turned_off(console):
    from lepton.serve import ServeConfig

    config = ServeConfig(models=SERVED, registry=console["registry"], rate_limit=0, ui_notice=False)
    with running(config) as base:
        html = httpx.get(base + "/ui/predict", timeout=30).text
    assert "not for diagnosis" not in html and "<main" in html


def test_whoami(console):
    assert _get(console, "/v1/whoami").json() == {"auth": True, "tenant": "clinic", "scope": "predict"}
    assert _get(console, "/v1/whoami", key="admin").json()["scope"] == "admin"
    assert _get(console, "/v1/whoami", key=None).status_code == 401


def test_a_hostile_model_card_renders_inert(console):
    r = _get(console, "/v1/models/cxr/card?version=2")
    assert r.status_code == 200
    body = r.json()
    assert body["markdown"] == XSS_CARD
    html = body["html"]
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not re.search(r"<[a-z]+[^>]*\son[a-z]+=", html)  # onerror/onclick only as escaped text
    assert "javascript:" not in re.sub(r"&[a-z]+;", "", " ".join(re.findall(r'href="([^"]*)"', html)))
    assert "<table>" in html  # Markdown itself still renders
    assert _get(console, "/v1/models/cxr/card").json()["version"] == 1  # default: the served version
    assert _get(console, "/v1/models/cxr/card?version=9").status_code == 404
    assert _get(console, "/v1/models/cxr/card?version=x").status_code == 422


def test_diff_between_versions(console):
    r = _get(console, "/v1/models/cxr/diff?a=1&b=2")
    assert r.status_code == 200 and r.json()["a"] == "cxr@1" and r.json()["data_changed"] is False
    assert _get(console, "/v1/models/cxr/diff?a=1&b=7").status_code == 404
    assert _get(console, "/v1/models/cxr/diff?a=1").status_code == 422
    assert _get(console, "/v1/models/nothere/diff?a=1&b=2").status_code == 404


def test_admin_actions_need_an_admin_key_and_take_effect_at_once(console):
    promote = {"version": 3, "stage": "production"}
    assert _post(console, "/v1/admin/models/cxr/promote", key=None, json=promote).status_code == 401
    assert _post(console, "/v1/admin/models/cxr/promote", json=promote).status_code == 403
    for bad in ({"version": 3, "stage": "archived"}, {"version": 0, "stage": "production"}, {"version": 3},
                {"version": 3, "stage": "production", "extra": 1}):
        r = _post(console, "/v1/admin/models/cxr/promote", key="admin", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert _post(console, "/v1/admin/models/cxr/promote", key="admin",
                 json={"version": 9, "stage": "production"}).status_code == 404
    r = _post(console, "/v1/admin/models/cxr/promote", key="admin", json=promote)
    assert r.status_code == 200 and r.json()["stage"] == "production"
    assert _get(console, "/v1/models/cxr").json()["version"] == 3  # served at once (reloaded)
    r = _post(console, "/v1/admin/models/cxr/rollback", key="admin")
    assert r.status_code == 200 and r.json()["version"] == 1
    assert _get(console, "/v1/models/cxr").json()["version"] == 1
    assert _post(console, "/v1/admin/models/cxr/rollback", key="admin").json()["version"] == 3  # and back again
    r = _post(console, "/v1/admin/models/solo/rollback", key="admin")
    assert r.status_code == 409 and "nothing to roll back to" in r.json()["error"]["message"]
    route = {"weights": {"1": 90, "2": 10}, "shadow": 3}
    assert httpx.put(console["url"] + "/v1/admin/models/cxr/route", json=route, timeout=30,
                     headers=auth(console["keys"]["clinic"])).status_code == 403
    r = httpx.put(console["url"] + "/v1/admin/models/cxr/route", json=route, timeout=30,
                  headers=auth(console["keys"]["admin"]))
    assert r.status_code == 200 and r.json()["weights"] == {"1": 90.0, "2": 10.0} and r.json()["shadow"] == 3
    info = _get(console, "/v1/models/cxr").json()
    assert info["route"] == {"1": 90.0, "2": 10.0} and info["shadow"] == 3
    for bad, status in (({"weights": {}}, 422), ({"weights": {"x": 1}}, 422), ({"weights": {"1": -1}}, 422),
                        ({"weights": {"1": 0}}, 422), ({"weights": {"1": "NaN"}}, 422), ({"weights": {"8": 1}}, 404),
                        ({"weights": {"1": 1}, "shadow": 8}, 404)):
        r = httpx.put(console["url"] + "/v1/admin/models/cxr/route", json=bad, timeout=30,
                      headers=auth(console["keys"]["admin"]))
        assert r.status_code == status, (bad, r.status_code, r.text)
    assert _get(console, "/readyz", key=None).status_code == 200  # still serving


def test_view_shows_an_upload_under_a_window(console, tmp_path):
    r = _post(console, "/v1/view?filename=a.png", content=png_bytes(size=40))
    assert r.status_code == 200 and r.json()["slices"] == 1
    import base64

    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (40, 40)
    # A CT series (zipped DICOM) under two windows: one PNG per slice, different pixels.
    series = ct_zip(tmp_path / "ct")
    lung = _post(console, "/v1/view?window=lung&filename=ct.zip", content=series)
    bone = _post(console, "/v1/view?window=bone&filename=ct.zip", content=series)
    assert lung.status_code == 200 and lung.json()["slices"] == 6 and lung.json()["window"] == "lung"
    assert lung.json()["indices"] == list(range(6))  # where each image's row of a volume's label map lies
    assert lung.json()["images"] != bone.json()["images"]
    assert _post(console, "/v1/view", content=b"not an image at all").status_code == 422
    assert _post(console, "/v1/view", content=b"").status_code == 400
    assert _post(console, "/v1/view?window=sideways&filename=ct.zip", content=series).status_code == 422
    assert _post(console, "/v1/view", key=None, content=png_bytes()).status_code == 401


def test_monitor_counts_what_the_server_answers(console):
    before = _get(console, "/v1/monitor").json()
    for seed in range(3):
        assert _post(console, "/v1/models/cxr/predict", content=png_bytes(seed)).status_code == 200
    assert _post(console, "/v1/models/cxr/predict", content=b"junk").status_code == 422
    after = _get(console, "/v1/monitor").json()
    assert after["requests_total"] >= before["requests_total"] + 4
    assert after["errors_total"] >= before["errors_total"] + 1
    assert sum(after["predictions"].values()) >= sum(before["predictions"].values()) + 3
    last = after["points"][-1]
    assert last["requests"] >= 4 and last["p50_ms"] is not None and last["p50_ms"] <= last["p99_ms"]
    assert _get(console, "/v1/monitor", key=None).status_code == 401


def test_predict_explanation_has_the_layers_apart(console):
    r = _post(console, "/v1/models/cxr/predict?explain=gradcam", content=png_bytes())
    body = r.json()["explanation"]
    import base64

    from PIL import Image

    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    base = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
    assert heat.mode == "RGBA" and base.size == heat.size
    assert min(heat.getchannel("A").getextrema()) == 0  # transparent where the map is 0
