"""The notebooks as a user sees them: JupyterLab in headless Chromium, Run All, then what is on screen.

    make test-browser       # = pytest -m browser tests/browser (not part of `make test`)

Each notebook in notebooks/ is copied with its tiny parameters injected (papermill's prepare-only mode,
outputs cleared), opened in JupyterLab, run with Run > Run All Cells, and checked: no error output, no
browser console error, every figure shown as an image (a matplotlib Figure that reaches the front end
without an image formatter shows up as the text `<Figure size 630x180 with 1 Axes>`), and, in the
tour, that typing a sentence and moving a slider redraw the picture, and in 02, that moving the step
slider and pressing Play change the time-lapse frame. Screenshots of every notebook
after its run go to runs/browser/ (git-ignored; LAB_BROWSER_ARTIFACTS moves them) for a failure to be
looked at.

Needs the `browser` extra (the `playwright` package; its own browser download is not used) and a
Chromium executable: /usr/bin/chromium (Debian's `chromium` package) or the path in LAB_CHROMIUM.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.notebook import runner as notebook

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LAB_BROWSER_ARTIFACTS", ROOT / "runs" / "browser"))
CHROMIUM = os.environ.get("LAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # the CI machines run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class Case:
    parameters: dict = field(default_factory=dict)  # injected after the parameters cell (out_dir is added)
    setup: Callable[[Path], dict] | None = None  # more parameters, made in the test process from a work dir
    min_images: int = 0  # images on screen after Run All (figures shown as PNGs)
    seconds: int = 150  # Run All must finish within this


def _fabricated_runs(work: Path) -> dict:
    """Three run directories with the files 02 reads (tests/test_analysis.py) and word-table snapshots
    for its explorer (tests/test_explorer.py), instead of training."""
    from test_analysis import fabricate_run
    from test_explorer import fabricate_snapshots

    modes = ("es", "nes", "gdes")
    return {
        "runs": {m: str(fabricate_snapshots(fabricate_run(work / m, m, seed=i))) for i, m in enumerate(modes)}
    }


def _tiny_run(work: Path) -> dict:
    """A 4-step pre-training run for 03 to fine-tune (its default trains 30 steps in the notebook)."""
    corpus = "synthetic:seed=0,words=30000"
    fields = {"steps": 4, "preset": "tiny", "batch_size": 4, "seq_len": 32, "corpus": corpus}
    return {"init": str(notebook.ensure_runs({"gdes": ""}, work, **fields)["gdes"])}


# One row per notebook: tiny parameters, so that all of them run in a few minutes on 2 CPU cores.
# A notebook without a row runs with its defaults (each notebook's defaults are a fast CPU size).
CASES = {
    # rtd + attention, then the same two views in the widget area; a short training for its default model
    "00_tour": Case({"train_steps": 40}, min_images=4),
    "01_pretrain": Case(
        {"steps": 6, "batch_size": 4, "seq_len": 32, "corpus": "synthetic:seed=0,words=30000"}, min_images=1
    ),
    "02_tug_of_war": Case(setup=_fabricated_runs, min_images=5),  # four figures, then the explorer's frame
    "03_downstream": Case({"max_train_examples": 8}, setup=_tiny_run, min_images=1),
    "04_experiment": Case(
        {"tasks": ["synth_gram"], "steps": 4, "pretrain_seeds": [0], "finetune_seeds": [1]}, min_images=2
    ),
}
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Text that must not appear in any output after Run All
BAD_TEXT = [
    r"Traceback",  # an error output (IPython prints the exception's traceback)
    r"<Figure size [^>]*>",  # a Figure without an image formatter: its repr instead of the picture
    r"Error displaying widget",  # the front end could not render a widget (e.g. tqdm's progress bar)
    r"IProgress not found",  # tqdm.auto fell back to text: ipywidgets missing in the kernel
]

# Console errors that are not the notebooks' doing, each with a pattern and why it is harmless. With
# JupyterLab 4.6 and Chromium 156 there are none (every console line lands in runs/browser/*-console.txt).
HARMLESS_CONSOLE: list[re.Pattern] = []


# ---------------------------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A JupyterLab server of this checkout's environment on a free localhost port, with a token."""

    def __init__(self, home: Path, log: Path):
        self.root = home / "notebooks"
        self.root.mkdir(parents=True)
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self._write_settings(home)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            # a private configuration: no user settings, no restored workspace, no saved widget state
            "JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "LAB_CACHE_DIR": str(home / "cache"),
        }
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",  # a taken port fails here instead of silently moving elsewhere
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--allow-root",  # CI runs as root; the server listens on localhost only, behind a token
            "--ServerApp.terminals_enabled=False",
            "--LabApp.extension_manager=readonly",  # no PyPI queries
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 90
        while True:
            try:
                self.api("status")
                return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"JupyterLab did not start on port {self.port}; its log: {log}"
                    ) from None
                time.sleep(0.5)

    @staticmethod
    def _write_settings(home: Path) -> None:
        settings = {
            # every cell stays attached to the page, so every output can be checked without scrolling
            "@jupyterlab/notebook-extension/tracker": {
                "windowingMode": "none",
                "autoStartDefaultKernel": True,
            },
            # no news or update checks: they would reach for the network
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        }
        for name, values in settings.items():
            path = home / "settings" / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        # the extension manager searches PyPI and the announcements plugin fetches news: both off
        disabled = {
            "@jupyterlab/extensionmanager-extension": True,
            "@jupyterlab/apputils-extension:announcements": True,
        }
        page_config = home / "config" / "labconfig" / "page_config.json"
        page_config.parent.mkdir(parents=True)
        page_config.write_text(json.dumps({"disabledExtensions": disabled}))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url(f"api/{path}"), method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_sessions(self) -> None:
        for session in self.api("sessions"):
            self.api(f"sessions/{session['id']}", method="DELETE")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


# Temporary folders of their own (not pytest's tmp_path): pytest prunes old base temp folders of
# concurrent sessions, which would pull the server's root away mid-run.
@pytest.fixture(scope="module")
def server():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lab-jupyterlab-") as home:
        lab = Server(Path(home), ARTIFACTS / "jupyterlab.log")
        try:
            yield lab
        finally:
            lab.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright: pip install -e '.[browser]' (or `make test-browser`)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (apt-get install -y chromium) "
            "or set LAB_CHROMIUM to a Chromium executable"
        )
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="lab-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,  # a fresh profile every run
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


# ---------------------------------------------------------------------------------------------- helpers


def prepare(path: Path, case: Case, server: Server) -> Path:
    """A copy of the notebook in the server's root with the case's parameters injected and no outputs."""
    import nbformat
    import papermill

    work = server.root.parent / "work" / path.stem
    parameters = {
        **case.parameters,
        **(case.setup(work / "inputs") if case.setup else {}),
        "out_dir": str(work),
    }
    notebook.check_parameters(path, parameters)  # a renamed parameter fails here, by name
    copy = server.root / path.name
    papermill.execute_notebook(
        str(path), str(copy), parameters=parameters, prepare_only=True, progress_bar=False
    )
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)  # saved widget views of the committed run would show before Run All
    nbformat.write(nb, copy)
    return copy


def run_all(page, server: Server, name: str, seconds: int) -> None:
    """Wait for the notebook's kernel, Run > Run All Cells, then wait until no cell is queued or running
    and the kernel is idle."""
    deadline = time.time() + 90
    while not any(  # Run All before the kernel is up asks which kernel to start
        s["path"].endswith(name) and s["kernel"]["execution_state"] == "idle" for s in server.api("sessions")
    ):
        assert time.time() < deadline, f"no idle kernel for {name} after 90 s"
        page.wait_for_timeout(500)
    page.wait_for_function(
        "() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') === 'idle'"
    )
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    # done: some cell has run, none is queued or running ([*]), the kernel is idle. A failing cell
    # ends Run All early, leaving the cells after it unrun ([ ]): the caller checks for that.
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')];
            const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
            return prompts.some(p => /\\[\\d+\\]/.test(p.textContent))
                && !prompts.some(p => p.textContent.includes('[*]'))
                && status?.getAttribute('data-status') === 'idle';
        }""",
        timeout=seconds * 1000,
        polling=500,
    )


def widget_images(page) -> list[bytes]:
    """The PNGs inside ipywidgets Output areas (the tour's redrawn views), in page order."""
    sources = page.locator(".widget-output img").evaluate_all("images => images.map(i => i.src)")
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources if s.startswith("data:image/png;base64,")]


def wait_for_new_images(page, before: list[bytes], seconds: int = 60) -> list[bytes]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        now = widget_images(page)
        if len(now) == len(before) and now != before:
            return now
        page.wait_for_timeout(300)
    return widget_images(page)


def check_tour_widgets(page) -> None:
    """Type a new sentence, then move the mask-prob slider: each must redraw the RTD picture."""
    first = widget_images(page)
    assert len(first) == 2, f"the tour's widget area shows {len(first)} images, expected 2 (RTD, attention)"
    box = page.locator(".widget-text input").first
    box.fill("zai vukral shou tra fouser .")
    box.press("Enter")
    typed = wait_for_new_images(page, first)
    assert typed[0] != first[0], "typing a new sentence did not redraw the RTD picture"
    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="mask prob"))
    readout = slider.locator(".widget-readout")
    start_value = readout.inner_text()
    slider.locator(".noUi-handle").focus()
    for _ in range(2):
        page.keyboard.press("ArrowRight")  # two steps of 0.05, as a user with the keyboard would
    moved = wait_for_new_images(page, typed)
    assert readout.inner_text() != start_value, "the mask-prob slider did not move"
    assert moved[0] != typed[0], f"moving mask prob to {readout.inner_text()} did not redraw the RTD picture"
    cell = page.locator(".jp-CodeCell", has=page.locator(".widget-text"))
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(ARTIFACTS / "00_tour-interactive.png"))


def check_explorer(page) -> None:
    """Move the step slider, then press Play: each must show another frame of the time-lapse."""
    first = widget_images(page)
    assert len(first) == 1, f"the explorer shows {len(first)} images, expected 1"
    slider = page.locator(".widget-slider", has=page.locator(".widget-label", has_text="step"))
    readout = slider.locator(".widget-readout")
    start_value = readout.inner_text()
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    moved = wait_for_new_images(page, first)
    assert readout.inner_text() != start_value, "the step slider did not move"
    assert moved != first, f"moving the step slider to {readout.inner_text()} did not change the image"
    page.locator(".widget-play button").first.click()  # Play: the slider advances by itself
    played = wait_for_new_images(page, moved)
    assert played != moved, "Play did not advance the frame"
    cell = page.locator(".jp-CodeCell", has=page.locator(".widget-play"))
    cell.scroll_into_view_if_needed()
    cell.screenshot(path=str(ARTIFACTS / "02_tug_of_war-explorer.png"))


INTERACTIONS = {"00_tour": check_tour_widgets, "02_tug_of_war": check_explorer}


def screenshot_whole(page, path: Path) -> None:
    """The whole notebook: a viewport as tall as the notebook, then back."""
    height = page.evaluate(  # the notebook's scrolling element (JupyterLab 4: the windowed panel's outer box)
        "() => Math.max(...[...document.querySelectorAll('.jp-Notebook, .jp-WindowedPanel-outer')]"
        ".map(e => e.scrollHeight))"
    )
    page.set_viewport_size({"width": 1280, "height": min(max(900, height + 200), 16000)})
    page.evaluate(
        "() => document.querySelectorAll('.jp-Notebook, .jp-WindowedPanel-outer').forEach(e => e.scrollTop = 0)"
    )
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1280, "height": 900})


# ---------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_in_jupyterlab(path, server, browser):
    case = CASES.get(path.stem, Case())
    copy = prepare(path, case, server)
    console: list[str] = []
    page = browser.new_page()
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"uncaught: {e}"))
    try:
        page.goto(server.url(f"lab/tree/{copy.name}") + "&reset", wait_until="domcontentloaded")
        run_all(page, server, copy.name, case.seconds)
        shown = "\n".join(page.locator(".jp-Notebook .jp-OutputArea-output").all_inner_texts())
        for bad in BAD_TEXT:
            assert not re.search(bad, shown), f"{bad!r} in the outputs:\n{shown[-3000:]}"
        prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
        assert all(re.search(r"\[\d+\]", p) for p in prompts), f"cells not run: {prompts}"
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-OutputArea-output img')].every(i => i.complete)"
        )
        sizes = page.locator(".jp-OutputArea-output img").evaluate_all(
            "images => images.map(i => i.naturalWidth)"
        )
        assert len(sizes) >= case.min_images and all(sizes), f"images on screen (natural widths): {sizes}"
        if path.stem in INTERACTIONS:
            INTERACTIONS[path.stem](page)
        errors = [
            m
            for m in console
            if m.startswith(("error:", "uncaught:")) and not any(p.search(m) for p in HARMLESS_CONSOLE)
        ]
        assert not errors, f"browser console errors: {errors}"
    finally:
        (ARTIFACTS / f"{path.stem}-console.txt").write_text("".join(m + "\n" for m in console))
        screenshot_whole(page, ARTIFACTS / f"{path.stem}.png")
        page.close()
        server.shutdown_sessions()
