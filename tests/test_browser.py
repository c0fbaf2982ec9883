"""A real browser (Debian's chromium, driven by Playwright) watches the %%mpimap widget move in JupyterLab."""

import os
import subprocess
import sys
import time

import nbformat
import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS, CLUSTER_PROFILE, REPO, free_port, seed_load, wait_for_jupyter

ARTIFACTS = os.path.join(REPO, "test-artifacts")
JOBS = 240
FAILING = (5, 60, 120)  # 3 of 180 jobs of a second run fail

BAR_WIDTHS = """n => {
    const bar = document.querySelectorAll('.mpitasker-bar')[n];
    if (!bar) return null;
    const width = sel => bar.querySelector(sel).getBoundingClientRect().width;
    return [width('.mpitasker-bar-done'), width('.mpitasker-bar-failed'), bar.getBoundingClientRect().width];
}"""


@pytest.fixture
def jupyterlab(tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the test command installs Debian's chromium (apt-get install chromium)")
    port, token = free_port(), "t" + os.urandom(8).hex()
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                             "--allow-root", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"))
    base = f"http://127.0.0.1:{port}"
    wait_for_jupyter(base, token, proc, tmp_path / "lab.log")
    yield base, token, tmp_path
    proc.terminate()
    proc.wait(15)


def test_widget_counts_move_and_end_at_the_total(jupyterlab, mpi_cluster):
    from playwright.sync_api import sync_playwright
    base, token, root = jupyterlab
    nb = nbformat.v4.new_notebook()
    magic = f"%%mpimap --profile {CLUSTER_PROFILE} -o r sweep.pkl for x in range({JOBS})"
    failing = f"%%mpimap --profile {CLUSTER_PROFILE} f.pkl for x in range(180)"
    nb.cells = [nbformat.v4.new_code_cell("%load_ext mpitasker_ext"),
                nbformat.v4.new_code_cell(magic + "\nimport time\ntime.sleep(0.05)\nx * x"),
                nbformat.v4.new_code_cell(failing + f"\nif x in {FAILING}:\n    raise ValueError(x)\nx")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "progress.ipynb")
    os.makedirs(ARTIFACTS, exist_ok=True)
    seen = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(f"{base}/lab/tree/progress.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90000)
        for index in range(2):
            run_cell(page, index)
        deadline = time.time() + 120
        while time.time() < deadline:
            done = page.locator(".mpitasker-done")
            if done.count():
                value = (int(done.first.get_attribute("data-done")), int(done.first.get_attribute("data-total")))
                if not seen or seen[-1] != value:
                    seen.append(value)
                if len(seen) == 3:
                    page.screenshot(path=os.path.join(ARTIFACTS, "widget-running.png"))
                if value[0] == JOBS and page.locator(".mpitasker-state", has_text="finished").count():
                    break
            time.sleep(0.2)
        try:
            page.wait_for_selector("text=mpimap: 240 results", timeout=30000)
            finished_bar = page.evaluate(BAR_WIDTHS, 0)
            run_cell(page, 2)
            page.wait_for_selector("text=3 of 180 jobs failed", timeout=60000)
            page.wait_for_function("() => document.querySelectorAll('.mpitasker-state').length == 2 && "
                                   "document.querySelectorAll('.mpitasker-state')[1].textContent == 'failed'",
                                   timeout=30000)
            failed_bar = page.evaluate(BAR_WIDTHS, 1)
        finally:
            page.screenshot(path=os.path.join(ARTIFACTS, "widget-finished.png"), full_page=True)
            outputs = page.locator(".jp-OutputArea").all_inner_texts()
            browser.close()
    assert seen, f"the widget never appeared; cell outputs: {outputs}"
    assert all(total == JOBS for _, total in seen)
    counts = [d for d, _ in seen]
    assert counts == sorted(counts) and len(set(counts)) >= 3, f"the counts did not move: {seen}"
    assert counts[-1] == JOBS
    assert [t[2] for t in seed_load(root / "sweep.pkl")] == [x * x for x in range(JOBS)]
    done, failed, whole = finished_bar
    assert whole > 100 and done == pytest.approx(whole, abs=1) and failed == 0, finished_bar
    done, failed, whole = failed_bar                  # in proportion: a sliver of red beside the green
    assert done == pytest.approx(whole * 177 / 180, abs=2) and 2 <= failed <= whole * 3 / 180 + 2, failed_bar


def run_cell(page, index, attempts=3):
    """Click a cell's editor and press Shift+Enter, until its prompt shows it ran ([*] or [n]).
    A key press right after the page loads can be lost; the prompt is the proof it was not."""
    prompt = page.locator(".jp-Cell .jp-InputPrompt").nth(index)
    for _ in range(attempts):
        page.locator(".jp-Cell .jp-InputArea-editor").nth(index).click()
        page.keyboard.press("Shift+Enter")
        deadline = time.time() + 10
        while time.time() < deadline:
            text = prompt.inner_text()
            if "*" in text or any(ch.isdigit() for ch in text):
                if index == 0:                 # the next cell needs this one finished, not just started
                    page.wait_for_function(
                        "el => /\\d/.test(el.textContent)", arg=prompt.element_handle(), timeout=30000)
                return
            time.sleep(0.1)
    raise AssertionError(f"cell {index} did not start after {attempts} tries")


LIVE_FIGURE = """import matplotlib.pyplot as plt
from IPython.display import display
fig, ax = plt.subplots(figsize=(5, 3))
(points,) = ax.plot([], [], ".-")
ax.set_xlim(0, 120)
ax.set_ylim(0, 1)
figure = display(fig, display_id=True)
plt.close(fig)
def draw(xs, ys):
    points.set_data(xs, ys)
    ax.set_title(f"{len(ys)} of 120 points")
    figure.update(fig)"""


def test_a_live_plot_changes_in_place_while_the_run_goes(jupyterlab, mpi_cluster):
    from playwright.sync_api import sync_playwright
    base, token, root = jupyterlab
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext mpitasker_ext"),
                nbformat.v4.new_code_cell(LIVE_FIGURE),
                nbformat.v4.new_code_cell(f"%%mpimap --profile {CLUSTER_PROFILE} --live draw curve.pkl "
                                          "for x in range(120)\nimport math, time\ntime.sleep(0.1)\n"
                                          "1 / (1 + ((x - 60) / 8) ** 2)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "live.ipynb")
    os.makedirs(ARTIFACTS, exist_ok=True)
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(f"{base}/lab/tree/live.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90000)
        run_cell(page, 0)
        run_cell(page, 1)
        area = page.locator(".jp-Cell").nth(1).locator(".jp-Cell-outputArea")
        plot = area.locator(".jp-OutputArea-output img")
        try:
            plot.wait_for(timeout=30000)
        except Exception:
            page.screenshot(path=os.path.join(ARTIFACTS, "live-plot-missing.png"), full_page=True)
            raise
        run_cell(page, 2)
        deadline = time.time() + 90
        while time.time() < deadline and len(shots) < 2:
            source = plot.get_attribute("src")
            if page.locator(".mpitasker-state", has_text="running").count() and (not shots or shots[-1][0] != source):
                page.wait_for_timeout(400)                # let the new image be drawn before the picture
                path = os.path.join(ARTIFACTS, f"live-plot-{len(shots)}.png")
                area.screenshot(path=path)                # the output area stays while its image is replaced
                if plot.get_attribute("src") == source:   # the picture shows this image, not the next one
                    shots.append((source, open(path, "rb").read()))
            time.sleep(0.3)
        done = page.locator(".mpitasker-done")
        while time.time() < deadline and done.count() and int(done.first.get_attribute("data-done")) < 50:
            time.sleep(0.2)
        news = page.get_by_role("button", name="No")
        if news.count():
            news.first.click()                            # JupyterLab's news question, in front of the widget
            page.wait_for_timeout(600)
        page.screenshot(path=os.path.join(ARTIFACTS, "live-curve.png"))   # the README's picture, mid-run
        page.wait_for_selector("text=mpimap: 120 results", timeout=60000)
        page.locator(".jp-Cell").nth(1).screenshot(path=os.path.join(ARTIFACTS, "live-plot-final.png"))
        final = plot.get_attribute("src")
        link = page.locator("a.mpitasker-open")                   # the widget's link opens the run in a Lab tab
        href, run = link.first.get_attribute("href"), link.first.get_attribute("data-mpitasker-run")
        link.first.click()
        page.wait_for_selector(".mpitasker-runview", timeout=30000)
        page.wait_for_function("() => document.querySelector('.mpitasker-runview').textContent.includes('120')",
                               timeout=30000)
        tab = page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current").first.inner_text()
        page.screenshot(path=os.path.join(ARTIFACTS, "live-run-tab.png"))
        browser.close()
    assert run == str(root / "curve.pkl") and href.startswith("/mpitasker/open?path=") and "curve.pkl" in tab, tab
    assert len(shots) == 2, "the plot did not change while the run went on"
    assert shots[0][0] != shots[1][0] and shots[0][1] != shots[1][1]    # another image, and it looks different
    assert final not in (shots[0][0], shots[1][0])                     # and the last call drew the whole curve
