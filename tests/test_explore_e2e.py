"""The run explorer end to end: a real tiny training run (`rlrt demo --tiny`, real processes,
an embedded Redis) writes samples every step; the running learner's admin app serves
/explore for its run dir; then `rlrt explore RUN_DIR --port 0` runs as a process and headless
Chromium loads its page: the DOM lists the steps and shows a rollout's tokens, shaded, with
hover values equal to the sample file's; a screenshot is saved under the test's tmp dir.

Chromium is Debian's `chromium` (`make browser` installs it; `make test` depends on it); the
test skips, naming the binary, only where none is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# A method whose teacher scores every rollout of every group (with the arithmetic problems'
# reference solution as context): the tiny random model never answers right, so RLRT itself
# would score nothing and the samples would hold no per-token values.
PLUGIN = '''
from rlrt_core.methods import MethodSpec, get_method, register_method

register_method(MethodSpec(name="rlrt_every_group", weight=get_method("rlrt").weight, teacher_scores="all",
                           score_groups="all", context="solution"))
'''


def _chromium() -> str:
    found = os.environ.get("RLRT_CHROMIUM") or next((b for b in map(shutil.which, BROWSERS) if b), None)
    if not found:
        pytest.skip(f"no Chromium binary ({', '.join(BROWSERS)}) on PATH; `make browser` installs Debian's chromium")
    return found


def _browse(chromium: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    # Root needs --no-sandbox; virtual time waits for the page's fetches before dumping.
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--window-size=1200,800",
                           *args, url], capture_output=True, text=True, timeout=60)


class _Dom(HTMLParser):
    """The elements the checks read: step items, token spans (with their text), histogram bars."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.steps: list[int] = []
        self.tokens: list[dict[str, str]] = []
        self.bars: list[dict[str, str]] = []
        self._in_tok = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        cls = a.get("class", "").split()
        if tag == "body":
            self.body = a
        elif tag == "li" and "step" in cls:
            self.steps.append(int(a["data-step"]))
        elif tag == "span" and "tok" in cls:
            self.tokens.append({**a, "text": ""})
            self._in_tok = True
        elif tag == "rect" and "bar" in cls:
            self.bars.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data: str) -> None:
        if self._in_tok:
            self.tokens[-1]["text"] += data


def _learner_admin(run_dir: Path, deadline: float) -> str:
    reg = run_dir / "services" / "learner-0.json"
    while time.time() < deadline:
        if reg.is_file():
            try:
                return f"http://127.0.0.1:{json.loads(reg.read_text())['admin_port']}"
            except (ValueError, KeyError):
                pass  # being written
        time.sleep(0.1)
    raise AssertionError("the learner never registered its admin port")


def test_explore_page_of_a_real_tiny_run_in_headless_chromium(tmp_path):
    chromium = _chromium()
    run_dir = tmp_path / "run"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "explore_methods.py").write_text(PLUGIN)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("RLRT__")}
    env.update({"PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]),
                "RLRT__METRICS__SAMPLE_EVERY": "1", "RLRT__METRICS__SAMPLE_ROLLOUTS": "6"})
    demo = subprocess.Popen([sys.executable, "-m", "services.cli.main", "demo", "--tiny", "--steps", "2",
                             "--method", "rlrt_every_group", "--plugin", "explore_methods", "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The running learner serves /explore for its own run dir.
        admin = _learner_admin(run_dir, time.time() + 120)
        page = httpx.get(f"{admin}/explore", timeout=10)
        assert page.status_code == 200 and 'id="heat"' in page.text
        listing = httpx.get(f"{admin}/explore/api/steps", timeout=10).json()
        assert listing["run_dir"] == str(run_dir)
        out, _ = demo.communicate(timeout=420)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, out[-3000:]
    files = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert files == ["step_000001.json", "step_000002.json"]
    doc = json.loads((run_dir / "samples" / "step_000002.json").read_text())
    assert len(doc["rollouts"]) == 6 and all("d_hat" in r and "d_bar_topk" in r for r in doc["rollouts"])

    server = subprocess.Popen([sys.executable, "-m", "services.cli.main", "explore", str(run_dir), "--port", "0"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/explore)", line)
        assert m, line + server.stderr.read() if server.poll() is not None else line
        url = m.group(1)
        r = httpx.get(f"{url}/api/steps/99", timeout=10)
        assert r.status_code == 404 and "no sample for step 99" in r.json()["detail"]

        pick = max(range(len(doc["rollouts"])), key=lambda j: len(doc["rollouts"][j]["token_ids"]))
        target = f"{url}#step=2&rollout={pick}&value=d_bar_topk"
        t0 = time.time()
        dumped = _browse(chromium, tmp_path / "profile", target, "--dump-dom")
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        dom = _Dom()
        dom.feed(dumped.stdout)
        assert dom.body.get("data-state") == "ready", dumped.stdout[-3000:]
        assert dom.steps == [2, 1]  # newest first
        r = doc["rollouts"][pick]
        assert [int(t["data-id"]) for t in dom.tokens] == r["token_ids"]
        assert [t["text"] for t in dom.tokens] == [p.replace("\n", "\u21b5\n") or "\u2205" for p in r["tokens"]]
        hist = doc["histograms"]["d_bar_topk"]
        vmax = hist["scale"] if hist["scale"] > 0 else hist["max"]  # shading saturates at the 95th percentile
        for t, tok in enumerate(dom.tokens):
            hat, bar = r["d_hat"][t], r["d_bar_topk"][t]
            assert float(tok["data-d-hat"]) == hat and float(tok["data-d-bar-topk"]) == bar
            # hover text: both values to 4 significant digits
            shown = dict(re.findall(r"(D\u0302_t|D\u0304_t \(top-k\)) = (\S+)", tok["title"]))
            assert float(shown["D\u0302_t"]) == pytest.approx(hat, rel=1e-3, abs=1e-12)
            assert float(shown["D\u0304_t (top-k)"]) == pytest.approx(bar, rel=1e-3, abs=1e-12)
            # shaded by D̄_t: white at 0, darker with the value up to the step's scale
            rgb = [int(x) for x in re.search(r"background: rgb\((\d+), (\d+), (\d+)\)", tok["style"]).groups()]
            assert rgb[0] >= rgb[1] and 255 - rgb[1] == pytest.approx((255 - 39) * min(1.0, bar / vmax), abs=1.01)
        assert [int(b["data-count"]) for b in dom.bars] == hist["counts"]

        shot = tmp_path / "explore.png"
        taken = _browse(chromium, tmp_path / "profile", target, f"--screenshot={shot}")
        assert taken.returncode == 0, taken.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        assert time.time() - t0 < 60
    finally:
        server.terminate()
        server.wait(timeout=10)
