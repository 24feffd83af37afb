"""The playground page in a real headless Chromium (the system's, driven by Playwright) against a real engine-serve:
the page loads with the vector picker filled, a generation returns, the steered column differs from the unsteered
one at a large coefficient, and the third column with the same coefficient as the second equals it (same seed)."""

from __future__ import annotations

import shutil

import pytest
import torch

from support import TINY
from support.lora import LINEARS, make_lora
from support.serving import ENGINE_ARGS, Server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    vectors = tmp_path_factory.mktemp("playground")
    torch.manual_seed(1)
    torch.save(torch.randn(64) * 40, vectors / "loud.pt")
    make_lora(tiny_model, vectors.parent / "poet", seed=3, r=8, lora_alpha=16, target_modules=LINEARS)
    srv = Server(*ENGINE_ARGS, "--vectors", str(vectors), "--adapter", f"poet={vectors.parent / 'poet'}")
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_the_playground_generates_steered_and_unsteered_side_by_side(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
            assert TINY in page.text_content("#model")
            assert page.eval_on_selector("#vector", "s => s.value").endswith("loud.pt")
            page.fill("#prompt", "The capital of France is")
            page.fill("#layer", "1")
            page.fill("#coef", "8")
            page.fill("#coef2", "8")
            page.fill("#max-tokens", "12")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60000)
            base, steered, third = (page.text_content(f"#out-{name}") for name in ("base", "steered", "third"))
            assert base and steered and steered != base
            assert third == steered  # the same coefficient and seed
            assert "coefficient 8" in page.text_content("#title-steered")

            page.fill("#coef2", "")  # the third column: the adapter, unsteered
            page.select_option("#adapter", "poet")
            page.click("#generate")
            page.wait_for_function("['done', 'error'].includes(document.getElementById('status').textContent) || "
                                   "document.getElementById('status').className === 'error'", timeout=60000)
            assert page.text_content("#status") == "done", page.text_content("#status")
            assert page.text_content("#out-base") == base and page.text_content("#out-steered") == steered
            assert page.text_content("#out-third") not in ("", base) and "poet" in page.text_content("#title-third")

            page.fill("#layer", "99")  # a layer the model lacks: the server's message, shown on the page
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60000)
            assert "99" in page.text_content("#status")
            assert not errors
        finally:
            browser.close()
