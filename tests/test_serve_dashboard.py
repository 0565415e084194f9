"""The dashboard in headless Chromium (Debian `chromium` + playwright): the expert-load heatmap
redraws with more routed tokens while load runs. Skipped when either is missing.
MOEKIT_DASHBOARD_SCREENSHOT=path.png also saves a screenshot (docs/serving.md uses one)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import time

import httpx
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from moekit.serve.testing import serve_in_thread, tiny_state  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (Debian package `chromium`)")
def test_heatmap_updates_under_load():
    state = tiny_state(max_num_seqs=4)
    with serve_in_thread(state) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 520})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/dashboard")
        page.wait_for_function("document.getElementById('heat').dataset.updates > 0", timeout=15000)
        before = float(page.eval_on_selector("#heat", "c => c.dataset.total"))

        def load(i):
            return httpx.post(url + "/v1/completions", json={"prompt": f"the fox {i} " * 8, "max_tokens": 24,
                                                               "ignore_eos": True}, timeout=60).status_code

        with cf.ThreadPoolExecutor(4) as ex:
            codes = list(ex.map(load, range(12)))
        assert codes == [200] * 12
        page.wait_for_function(f"Number(document.getElementById('heat').dataset.total) > {before + 100}",
                               timeout=15000)
        assert page.inner_text("#tps") not in ("-", "")
        assert page.inner_text("#bal") not in ("-", "")
        shot = os.environ.get("MOEKIT_DASHBOARD_SCREENSHOT")
        if shot:
            time.sleep(1.0)
            page.screenshot(path=shot)
        browser.close()
        assert errors == []
