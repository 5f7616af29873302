"""The validation and evaluation pages: self-contained (nothing loaded from outside the file), and, in headless
Chromium with the network blocked, the rendered DOM shows every expectation, the first failure in the first
screen, every candidate and every plot decoded. Screenshots land in the test's temp dir."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from alignpipe.cli.main import main
from alignpipe.reports.evaluation_page import evaluation_html, write_evaluation_page
from alignpipe.reports.validation_page import split_example, validation_html
from alignpipe.reports.evaluation import plot_distributions, plot_score_vs_kl

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
WINDOW = (1280, 800)  # the first screen of a laptop browser
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed "
                                                           "(Debian: apt-get install -y chromium)")
# Appended to a copy of the page under test: writes what the browser rendered into the DOM that --dump-dom prints.
PROBE = """<script>addEventListener("load", () => {
  const rows = s => Array.from(document.querySelectorAll(s));
  const first = document.querySelector("#failures tr.failure");
  const box = first && first.getBoundingClientRect();
  const external = rows("[src],[href]").map(e => e.getAttribute("src") || e.getAttribute("href"))
    .filter(u => !u.startsWith("data:") && !u.startsWith("#"));
  const probe = {
    expectation_rows: rows("tr.expectation").length,
    failed_rows: rows("tr.expectation.fail").length,
    first_failure: first ? {text: first.innerText, bottom: box.bottom, screen: innerHeight} : null,
    markup_in_failure: first ? first.querySelectorAll("b").length : null,
    candidates: rows("tr.candidate").map(r => r.dataset.name),
    images: rows("img.plot").map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
    gate: (document.getElementById("gate") || {}).innerText || null,
    external: external,
    resources: performance.getEntriesByType("resource").map(r => r.name),
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});</script>"""


def chromium(page: Path, *flags: str) -> str:
    """Run headless Chromium on `page` with every host unresolvable and a dead proxy (no network), a fresh profile
    and HOME in a temp dir, no crash reporter and no /dev/shm; its stdout. Failure messages carry its stderr."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as home:
        command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions", "--no-first-run",
                   "--disable-quic", "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", "--disable-dev-shm-usage", "--disable-crash-reporter", "--disable-breakpad",
                   f"--user-data-dir={home}/profile", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                   "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                   "--proxy-bypass-list=<-loopback>", *flags, page if isinstance(page, str) else page.as_uri()]
        env = {**os.environ, "HOME": home, "TMPDIR": home}
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-3000:]}"
    return done.stdout


@functools.cache
def browser_broken() -> str | None:
    """Why headless Chromium cannot render even a one-line page here (a broken browser install, not our page)."""
    try:
        dom = chromium("data:text/html,<p id=ok>ok</p>", "--dump-dom")
    except AssertionError as error:
        return str(error)[-500:]
    return None if 'id="ok"' in dom else "no DOM from a one-line page"


@pytest.fixture
def working_browser():
    """Skips, saying why, where the browser itself cannot start (then no page of ours can be judged)."""
    broken = browser_broken()
    if broken:
        pytest.skip(f"headless Chromium cannot render a one-line page on this machine: {broken}")


def render(page: Path, shots: Path) -> dict:
    """The probe's figures for `page` (rendered from a probed copy) and a screenshot of the page itself."""
    probed = shots / f"{page.parent.name}-{page.stem}.probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(probed, "--dump-dom", "--virtual-time-budget=5000")
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    shot = shots / f"{page.parent.name}-{page.stem}.png"
    chromium(page, f"--screenshot={shot}")
    assert shot.stat().st_size > 0
    import html

    return json.loads(html.unescape(match.group(1)))


def assert_self_contained(text: str) -> None:
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert all(src.startswith("data:") for src in re.findall(r'\ssrc="([^"]*)"', text))
    assert not re.findall(r'\shref="', text)


def failing_corpus(tmp_path: Path) -> Path:
    """A data directory whose prompts.jsonl has one bad row (line 2: a prompt over the 16-char limit set below,
    with markup in it); the corpus split is good."""
    corpus = tmp_path / "data"
    corpus.mkdir()
    shutil.copy(DATA / "good" / "corpus.jsonl", corpus / "train.jsonl")
    rows = [{"prompt": "import os", "source": "a.py:1"}, {"prompt": "<b>bold</b> & too long", "source": "a.py:3"}]
    (corpus / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus


def evaluation_report(out: Path) -> dict:
    """An evaluate report.json dict for three candidates and a champion, with the stage's two real plots."""
    def metrics(vpc, kl, reward):
        return {"path": "p", "objective": "mle", "kl_estimate": "token", "violations_per_char": vpc,
                "violations_per_char_ci_low": vpc * 0.8, "violations_per_char_ci_high": vpc * 1.2,
                "zero_violation_frac": 0.5, "empty_frac": 0.0, "win_rate_vs_ref": 0.5, "win_rate_vs_champion": 0.4,
                "kl_to_ref": kl, "reward_score": reward, "heldout_ppl": 40.0, "heldout_nats_per_char": 1.1}
    report = {"best_candidate": "dpo", "gate_metric": "violations_per_char", "order": ["pretrain", "dpo", "ppo"],
              "candidates": {"pretrain": metrics(0.05, 0.0, 0.1), "dpo": metrics(0.02, 1.5, 0.7),
                             "ppo": metrics(0.03, 2.5, 0.9)},
              "reference": {"name": "pretrain", "path": "p"},
              "champion": {"model": "alignpipe-policy", "alias": "champion", "uri": "models:/x", "version": "3",
                           "violations_per_char": 0.04, "zero_violation_frac": 0.4},
              "prompts": {"path": "data/prompts.jsonl", "n": 8}, "heldout": {"path": "v", "chars": 100},
              "reward_model": "artifacts/reward",
              "sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 48, "seed": 0}}
    plot_score_vs_kl(report, out / "score_vs_kl.png")
    plot_distributions({n: [0.01, 0.02, 0.05] for n in report["order"]}, {n: [0.1, 0.5] for n in report["order"]},
                       out / "score_distributions.png")
    return report


def test_split_example_and_escaping():
    assert split_example('lines 1, 4: prompt="x"') == ("lines 1, 4", 'prompt="x"')
    assert split_example("file is empty") == ("", "file is empty")
    check = {"expectation": "expect_x", "column": "chosen", "success": False, "unexpected_count": 1,
             "example": 'line 2: chosen="<script>alert(1)</script>"'}
    page = validation_html({"files": [{"path": "a<b>.jsonl", "kind": "prefs", "rows": 3, "success": False,
                                       "expectations": [{**check, "success": True}, check]}]})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&lt;b&gt;.jsonl" in page
    # failures first: the failure table, then the failed expectation before the passed one in the file's table
    assert page.index('id="failures"') < page.index('class="expectation fail"') < page.index('class="expectation pass"')
    assert_self_contained(page)


def test_oracle_columns_are_named_by_the_task(tmp_path):
    """report.md and report.html name the oracle columns as the task does (arith: an error rate), PEP8's names by
    default."""
    from alignpipe.reports.evaluation import summary_markdown
    from alignpipe.tasks import get_task

    report = evaluation_report(tmp_path)
    assert "| violations/char (95% CI) | zero-violation |" in summary_markdown(report)
    assert "<th>violations/char (95% CI)</th>" in evaluation_html(report, tmp_path)
    arith = {**report, "oracle_labels": get_task("arith").oracle_labels()}
    table, page = summary_markdown(arith), evaluation_html(arith, tmp_path)
    assert "| error rate (non-empty answers) (95% CI) | correct |" in table and "violations/char" not in table
    assert "<th>error rate (non-empty answers) (95% CI)</th><th>correct</th>" in page
    assert "violations/char" not in page
    assert get_task("pep8").oracle_labels() == {"violations_per_char": "violations/char",
                                                "zero_violation_frac": "zero-violation"}


def test_evaluation_page_shows_the_reward_hacking_verdict_when_the_report_has_one(tmp_path):
    report = evaluation_report(tmp_path)
    assert "Reward hacking" not in evaluation_html(report, tmp_path)
    page = evaluation_html({**report, "reward_hacking": {"ppo": "reward up 0.8, oracle worse: <hacked>"}}, tmp_path)
    assert '<ul id="reward-hacking"><li>ppo: reward up 0.8, oracle worse: &lt;hacked&gt;</li></ul>' in page
    assert page.count('<img class="plot"') == 2 and "champion v3</td><td></td><td>0.04</td>" in page


@needs_browser
def test_validation_page_in_a_browser_shows_the_failure_first(tmp_path, capsys, working_browser):
    corpus = failing_corpus(tmp_path)
    out = tmp_path / "validate"
    code = main(["validate", "--corpus", str(corpus), "--prefs", "", "--out", str(out),
                 "--params", str(ROOT / "configs" / "tiny.yaml"),
                 "--set", "validate.max_field_chars=16"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    page = tmp_path / "validate.failed" / "report.html"
    assert f"failure report kept in {page}" in err
    report = json.loads((page.parent / "report.json").read_text())
    assert_self_contained(page.read_text(encoding="utf-8"))

    probe = render(page, tmp_path)
    n_listed = sum(len(f["expectations"]) for f in report["files"])
    print(f"validation page: {probe['expectation_rows']} expectation rows (report.json lists {n_listed}), "
          f"{probe['failed_rows']} failed; first failure bottom at {probe['first_failure']['bottom']:.0f} px of a "
          f"{probe['first_failure']['screen']} px screen: {probe['first_failure']['text']!r}")
    assert probe["expectation_rows"] == n_listed == report["n_expectations"]
    assert probe["failed_rows"] == report["n_failed_expectations"] == 1
    first = probe["first_failure"]
    assert first["bottom"] <= first["screen"]  # visible without scrolling
    assert str(corpus / "prompts.jsonl") in first["text"] and "line 2" in first["text"]
    assert "prompt" in first["text"] and '<b>bold</b> & too long' in first["text"]  # shown as text, escaped
    assert probe["markup_in_failure"] == 0
    assert probe["external"] == [] and probe["resources"] == []


@needs_browser
def test_evaluation_page_in_a_browser_shows_every_candidate_and_plot(tmp_path, working_browser):
    out = tmp_path / "evaluate"
    out.mkdir()
    report = evaluation_report(out)
    page = write_evaluation_page(report, out)
    assert_self_contained(page.read_text(encoding="utf-8"))

    probe = render(page, tmp_path)
    print(f"evaluation page: candidates {probe['candidates']}, images {probe['images']}, gate {probe['gate']!r}")
    assert probe["candidates"] == report["order"]
    assert [i["alt"] for i in probe["images"]] == ["score_distributions", "score_vs_kl"]
    assert all(i["complete"] and i["width"] > 0 for i in probe["images"])
    assert "dpo" in probe["gate"] and "ahead of" in probe["gate"]
    assert probe["external"] == [] and probe["resources"] == []
