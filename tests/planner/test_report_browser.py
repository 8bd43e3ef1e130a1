"""The capacity-plan page in a real headless browser: Debian's Chromium driven by Playwright.

Renders plan.html from a file URL with the network cut off (the page must be self-contained) and
asserts that the verdict banner, every section heading and both charts are visible. Chromium comes
from the system (scripts/ci-services.sh installs Debian's package); Playwright never downloads a
browser here. `LOWREGRET_SCREENSHOT=PATH` also saves a full-page screenshot (docs/planner-report.png
was made that way).
"""

import os
import shutil

import pytest

from planner.plan import build_plan
from planner.report import report_sections, write_report
from tests.planner.fakes import FakeProfile

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    plan = build_plan("Llama-3.1-8B", 16, profile=FakeProfile(6.25e5, 72_517, examples=674, total_tokens=101_272))
    return plan, write_report(plan, tmp_path_factory.mktemp("report") / "plan")["plan.html"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: run scripts/ci-services.sh (Debian's "
                                             "chromium package) to render the report in a real browser")
def test_report_renders_in_chromium(page_file):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    plan, path = page_file
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
            requests = []
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            banner = page.locator("#verdict")
            assert banner.is_visible()
            assert banner.inner_text().startswith("LOW-REGRET: LoRA rank 16 should match full fine-tuning")
            assert "low-regret" in banner.get_attribute("class")
            for section in report_sections(plan):
                heading = page.get_by_role("heading", name=section.title, exact=True)
                assert heading.is_visible(), section.title
            charts = page.locator("figure img")
            assert charts.count() == 2
            for i in range(2):  # decoded and drawn at a readable size, not a broken-image icon
                assert charts.nth(i).evaluate("img => img.complete && img.naturalWidth") > 600
                assert charts.nth(i).bounding_box()["width"] > 600
            assert page.locator("table").count() >= 6
            assert "{'" not in page.inner_text("body")  # no Python dict reprs left on the page
            assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
            if os.environ.get("LOWREGRET_SCREENSHOT"):
                page.screenshot(path=os.environ["LOWREGRET_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
