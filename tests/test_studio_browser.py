"""qtune studio as a person uses it: a real headless Chromium (Debian's chromium and chromedriver, driven by selenium;
nothing downloads a browser) opens the page, starts a short run, watches its loss curve grow, opens the finished
adapter, asks the playground and plans a GPU. Screenshots of every screen are kept in results/studio/.

`make test` installs chromium and chromium-driver where apt-get can (the `browser` target); elsewhere these tests
are skipped, saying so.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_model_folder, write_jsonl
from tests.test_train import ROWS

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "results" / "studio"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium/chromedriver: `make browser` installs Debian's (apt-get install chromium chromium-driver)",
)
XSS = '<img src=x onerror="window.pwned=1">'
LABELLED = [("the movie was great", "pos"), ("a dull boring film", "neg"), ("wonderful acting", "pos")] * 4
OPEN: list = []  # the browser of this module, so that a timeout can say what error the page shows


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1360,900", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    driver.implicitly_wait(0)
    OPEN.append(driver)
    yield driver
    OPEN.remove(driver)
    driver.quit()


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    """Poll `condition()` until it returns something truthy (what it returns), or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - an element not there yet, or replaced while read
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{page_errors()}")
        time.sleep(0.2)


def page_errors() -> str:
    """The errors the page shows (a screen's banner, beside a field, under a run), to say why a wait timed out."""
    from selenium.webdriver.common.by import By

    shown = []
    for driver in OPEN:
        try:
            for node in driver.find_elements(By.CSS_SELECTOR, ".banner-error, .field-error, .error-line"):
                if node.is_displayed() and node.text.strip():
                    shown.append(node.text.strip())
        except Exception:  # noqa: BLE001 - the page is gone or changing: the timeout says enough
            pass
    return f"; the page shows: {' | '.join(shown)}" if shown else ""


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def all_css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a real rendering, not an empty page
    return path


def console_errors(driver) -> list[str]:
    """The page's errors in the browser console; Chromium also logs every 4xx response there, and the tests send
    bad input on purpose (the page shows those errors beside the field), so 400s are not counted."""
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return [m for m in severe if "the server responded with a status of 400" not in m]


def set_field(driver, key: str, value: str) -> None:
    field = css(driver, f'#run-form [name="{key}"]')
    field.clear()
    field.send_keys(value)


def open_form(driver, url: str, config: str) -> None:
    """Open the Runs screen and choose `config` in the new-run form; wait for its fields."""
    from selenium.webdriver.support.ui import Select

    driver.get(url + "/#runs")
    wait_for(lambda: all_css(driver, f"#run-config option[value='{config}']"), what="the config list")
    Select(css(driver, "#run-config")).select_by_value(config)
    wait_for(lambda: css(driver, '#run-form [name="output.name"]'), what="the form of the config")


def run_state(driver, name: str) -> str:
    return css(driver, f'#runs-list .run[data-name="{name}"] .run-state').text.strip()


def chart_points(driver, selector: str) -> int:
    """How many points a loss line of the chart draws (its path's M/L commands)."""
    d = css(driver, selector).get_attribute("d") or ""
    return sum(d.count(c) for c in "ML")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, chatml_tokenizer):
    """A project folder with a tiny model, data and a config, and the studio serving it."""
    from qtune.serve.app import ServerThread
    from qtune.studio.app import create_studio_app
    from qtune.studio.common import Studio

    project = tmp_path_factory.mktemp("project").resolve()
    make_model_folder(project / "tiny-model", chatml_tokenizer)
    write_jsonl(project / "train.jsonl", ROWS * 4)
    (project / "configs").mkdir()
    config = {
        "model": {"name": "tiny-model", "dtype": "fp32"},
        "quant": {"method": "none"},
        "lora": {"r": 4},
        "data": {"train": "train.jsonl", "eval_fraction": 0.25},
        # About 25 steps a second here: 400 steps run long enough to be watched.
        "train": {"max_steps": 400, "batch_size": 4, "logging_steps": 1, "save_every": 100, "eval_every": 100},
    }
    (project / "configs" / "tiny.yaml").write_text("# a tiny run for the browser tests\n" + yaml.safe_dump(config))
    labelled = [{"text": t, "label": label} for t, label in LABELLED]
    write_jsonl(project / "labels.jsonl", labelled)
    classifier = {
        "recipe": "classify",
        **{k: config[k] for k in ("model", "quant", "lora")},
        "data": {"train": "labels.jsonl", "eval": "labels.jsonl"},
        "train": {"max_steps": 20, "batch_size": 4, "lr": 0.01, "save_every": 10},
    }
    (project / "configs" / "tiny_cls.yaml").write_text("# a tiny classifier\n" + yaml.safe_dump(classifier))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(project / ".qtune-home"))
        mp.chdir(project)  # `qtune studio` is started in the project folder: relative paths are the project's
        studio = Studio(project=project, dir=project / "adapters", quant="none", dtype="fp32")
        studio.dir.mkdir()
        with ServerThread(create_studio_app(studio)) as url:
            yield {"url": url, "studio": studio, "project": project}


def test_start_a_run_watch_its_loss_curve_grow_and_see_it_finish(browser, studio):
    open_form(browser, studio["url"], "project:configs/tiny.yaml")
    set_field(browser, "output.name", "browser-run")
    set_field(browser, "train.lr", "abc")
    css(browser, "#run-start").click()
    error = wait_for(
        lambda: css(browser, '.field-error[data-field="train.lr"]').text.strip(), what="the error beside train.lr"
    )
    assert "train.lr" in error and "'abc'" in error  # names the key and the value it refused
    assert "has-error" in css(browser, '#run-form [name="train.lr"]').get_attribute("class").split()
    assert not (studio["studio"].dir / ".studio" / "browser-run.yaml").exists()  # refused before anything ran

    set_field(browser, "train.lr", "0.01")
    css(browser, "#run-start").click()
    wait_for(lambda: run_state(browser, "browser-run") in ("starting", "running"), what="the new run in the list")
    css(browser, '#runs-list .run[data-name="browser-run"]').click()
    wait_for(lambda: run_state(browser, "browser-run") == "running", timeout=120, what="the run to start training")
    first = wait_for(lambda: chart_points(browser, "#run-detail svg.loss-chart path.train-loss"), what="a loss point")
    later = wait_for(
        lambda: (n := chart_points(browser, "#run-detail svg.loss-chart path.train-loss")) > first and n,
        what="the loss curve to grow while the run trains",
    )
    assert later > first
    shot(browser, "runs-live")
    wait_for(lambda: run_state(browser, "browser-run") == "finished", timeout=180, what="the run to finish")
    wait_for(lambda: all_css(browser, "#run-detail svg.loss-chart path.eval-loss"), what="the held-out loss line")
    assert "adapter written" in css(browser, "#run-log").text
    assert (studio["studio"].dir / "browser-run" / "qtune.json").is_file()
    shot(browser, "runs")
    assert not console_errors(browser)


def test_stop_a_run_then_resume_it(browser, studio):
    open_form(browser, studio["url"], "project:configs/tiny.yaml")
    set_field(browser, "output.name", "stopped-run")
    set_field(browser, "train.max_steps", "100000")
    set_field(browser, "train.save_every", "50")
    css(browser, "#run-start").click()
    wait_for(lambda: all_css(browser, '#runs-list .run[data-name="stopped-run"]'), what="the run in the list")
    css(browser, '#runs-list .run[data-name="stopped-run"]').click()
    progress = studio["studio"].dir / "stopped-run.checkpoints"
    wait_for(lambda: len(list(progress.glob("checkpoint-*"))) > 0, timeout=150, what="a first checkpoint")
    wait_for(lambda: css(browser, "#run-stop").is_enabled(), what="Stop to be enabled")
    css(browser, "#run-stop").click()
    wait_for(lambda: run_state(browser, "stopped-run") == "interrupted", timeout=90, what="the run to stop")
    wait_for(lambda: css(browser, "#run-resume").is_enabled(), what="Resume to be enabled")
    shot(browser, "runs-interrupted")
    css(browser, "#run-resume").click()
    wait_for(lambda: run_state(browser, "stopped-run") == "running", timeout=120, what="the resumed run to train")
    assert "resuming from" in wait_for(
        lambda: "resuming from" in css(browser, "#run-log").text and css(browser, "#run-log").text,
        what="the resume line in the log",
    )
    css(browser, "#run-stop").click()  # (not to the end: the next tests need the machine)
    wait_for(lambda: run_state(browser, "stopped-run") == "interrupted", timeout=90, what="the second stop")
    assert not console_errors(browser)


def test_the_finished_adapter_its_samples_as_text_and_a_push_preview(browser, studio):
    adapter = studio["studio"].dir / "browser-run"
    wait_for(lambda: (adapter / "qtune.json").is_file(), timeout=5, what="the adapter of the first test")
    # A sample whose answer is markup: it must show as text, never become an element.
    meta = json.loads((adapter / "qtune.json").read_text())
    meta.setdefault("samples", [{"prompt": "p", "reference": "r", "answer": "a"}])
    meta["samples"][0]["answer"] = XSS
    (adapter / "qtune.json").write_text(json.dumps(meta))
    browser.get(studio["url"] + "/#adapters")
    wait_for(lambda: all_css(browser, '#adapters-list .adapter[data-name="browser-run"]'), what="the adapter list")
    css(browser, '#adapters-list .adapter[data-name="browser-run"]').click()
    wait_for(lambda: css(browser, "#adapter-metrics").text.strip(), what="the adapter's metrics")
    samples = wait_for(lambda: css(browser, "#adapter-samples").text, what="the samples")
    assert XSS in samples
    assert not all_css(browser, "#adapter-samples img") and browser.execute_script("return window.pwned") is None
    wait_for(lambda: all_css(browser, "#adapter-detail svg.loss-chart path.train-loss"), what="the loss curve")
    css(browser, "#push-repo").send_keys("alice/browser-run")
    css(browser, "#push-go").click()
    card = wait_for(lambda: css(browser, "#push-card").text.strip(), what="the model card preview")
    # the card names the repo it would be pushed to and the base it was trained on (a local folder: by its name)
    assert "alice/browser-run" in card
    assert "`tiny-model`" in card
    assert "adapter_model.safetensors" in css(browser, "#push-files").text
    shot(browser, "adapters")
    assert not console_errors(browser)


def test_the_playground_streams_the_base_and_the_adapter_side_by_side(browser, studio):
    browser.get(studio["url"] + "/#playground")
    state = wait_for(lambda: css(browser, "#pg-state").text.strip(), what="the playground's state")
    if state != "ready":
        assert state == "idle", state
        css(browser, "#pg-load").click()
    wait_for(lambda: all_css(browser, "#pg-models input[value='browser-run']"), timeout=120, what="models to load")
    for model in ("base", "browser-run"):
        box = css(browser, f"#pg-models input[value='{model}']")
        if not box.is_selected():
            box.click()
    # The page's own markup has no img, script or iframe in the playground: any found after Send was made from the
    # prompt or an answer. (window.pwned alone proves little: the CSP would block the onerror handler anyway.)
    made = "return document.querySelectorAll('#screen-playground :is(img, script, iframe, svg, a)').length"
    assert browser.execute_script(made) == 0
    # What the page sends: a wrapper around fetch records each request body (the page's fetch still answers).
    browser.execute_script(
        "window.sent = []; const f = window.fetch;"
        "window.fetch = (url, init) => { window.sent.push([String(url), init && init.body]); return f(url, init); };"
    )
    prompt = "Is this movie review positive or negative? " + XSS
    css(browser, "#pg-prompt").send_keys(prompt)
    css(browser, "#pg-send").click()
    for model in ("base", "browser-run"):
        wait_for(
            lambda m=model: css(browser, f'.pg-answer[data-model="{m}"]').get_attribute("data-done") == "true",
            what=f"{model}'s answer to finish streaming",
        )
        answer = css(browser, f'.pg-answer[data-model="{model}"]')
        assert not all_css(answer, ".error-line"), answer.text
        assert css(answer, ".pg-text").text.strip()
        # the streamed answer is text nodes only, whatever the model wrote
        assert browser.execute_script("return arguments[0].querySelector('.pg-text').childElementCount", answer) == 0
    assert css(browser, "#pg-prompt").get_attribute("value") == prompt  # the textarea keeps it as typed
    sent = browser.execute_script("return window.sent")
    chats = {json.loads(body)["model"]: json.loads(body) for url, body in sent if url == "/v1/chat/completions"}
    assert set(chats) == {"base", "browser-run"}
    for body in chats.values():
        assert body["messages"] == [{"role": "user", "content": prompt}]  # the prompt reaches the model as typed
    assert browser.execute_script(made) == 0
    assert browser.execute_script("return window.pwned") is None
    shot(browser, "playground")
    assert not console_errors(browser)


def test_a_classifier_from_the_page_its_confusion_matrix_an_export_and_its_probabilities(browser, studio):
    open_form(browser, studio["url"], "project:configs/tiny_cls.yaml")
    set_field(browser, "output.name", "cls-run")
    css(browser, "#run-start").click()
    wait_for(lambda: run_state(browser, "cls-run") == "finished", timeout=180, what="the classifier's run to finish")

    browser.get(studio["url"] + "/#adapters")
    wait_for(lambda: all_css(browser, '#adapters-list .adapter[data-name="cls-run"]'), what="the classifier")
    css(browser, '#adapters-list .adapter[data-name="cls-run"]').click()
    rows = wait_for(lambda: all_css(browser, "#adapter-confusion tbody tr"), what="the confusion matrix")
    assert len(rows) == 2 and {"neg", "pos"} <= set(css(browser, "#adapter-confusion").text.split())
    # The matrix counts every held-out text once.
    counts = [int(c.text) for c in all_css(browser, "#adapter-confusion tbody td") if c.text.strip().isdigit()]
    assert sum(counts) == len(LABELLED)
    shot(browser, "adapters-classifier")
    css(browser, "#export-go").click()  # refused at once: export takes causal-LM adapters
    refused = wait_for(lambda: css(browser, '.field-error[data-field="format"]').text, what="the export refused")
    assert "classification adapter" in refused and not (studio["studio"].dir / "exports").exists()

    browser.execute_script("window.scrollTo(0, 0)")  # (the list's top is under the sticky header otherwise)
    css(browser, '#adapters-list .adapter[data-name="browser-run"]').click()
    wait_for(lambda: "browser-run" in css(browser, "#adapter-name").text, what="the causal-LM adapter")
    css(browser, "#export-go").click()  # peft, the default format
    wait_for(lambda: css(browser, "#export-state").text.strip() == "done", what="the export job to finish")
    assert "browser-run-peft" in css(browser, "#export-out").text
    assert (studio["studio"].dir / "exports" / "browser-run-peft" / "adapter_config.json").is_file()

    browser.get(studio["url"] + "/#playground")
    wait_for(lambda: css(browser, "#pg-state").text.strip() == "ready", what="the loaded playground")
    css(browser, "#pg-load").click()  # "Reload adapters": registers the classifier trained since
    wait_for(lambda: all_css(browser, "#pg-models input[value='cls-run']"), what="the classifier in the playground")
    box = css(browser, "#pg-models input[value='cls-run']")
    if not box.is_selected():
        box.click()
    css(browser, "#pg-prompt").clear()
    css(browser, "#pg-prompt").send_keys("the movie was great")
    css(browser, "#pg-send").click()
    answer = '.pg-answer[data-model="cls-run"]'
    wait_for(lambda: css(browser, answer).get_attribute("data-done") == "true", what="the classifier's answer")
    probs = all_css(browser, f"{answer} .pg-prob")
    assert {p.get_attribute("data-label") for p in probs} == {"neg", "pos"}
    assert all(any(ch.isdigit() for ch in p.text) for p in probs)
    shot(browser, "playground-classifier")
    assert not console_errors(browser)


def fill_plan(driver, seq: str, checkpointing: str, vram: str = "8GB") -> None:
    from selenium.webdriver.support.ui import Select

    Select(css(driver, "#plan-model")).select_by_value("llama-3.1-8b")
    for selector, value in (("#plan-vram", vram), ("#plan-seq", seq)):
        css(driver, selector).clear()
        css(driver, selector).send_keys(value)
    Select(css(driver, "#plan-checkpointing")).select_by_value(checkpointing)


def test_plan_a_7b_run_on_an_8gb_card(browser, studio):
    """An 8B at 8 GB: at seq 2048 without gradient checkpointing it does not fit (the planner says ~23 GiB); with
    checkpointing at seq 512 it fits. The page shows the planner's own numbers: the total, the longest sequence,
    one bar segment per part."""
    from qtune.studio.plan import plan

    def expect(seq: int, checkpointing: str) -> dict:
        body = {"model": "llama-3.1-8b", "vram": "8GB", "seq": seq, "lora_r": 16, "quant": "nf4", "batch": 1}
        return plan(studio["studio"], {**body, "gradient_checkpointing": checkpointing})

    def verdict_after(previous: str | None) -> str:
        css(browser, "#plan-go").click()
        return wait_for(
            lambda: (v := css(browser, "#plan-verdict").text.strip()) and v != previous and v, what="the new verdict"
        )

    big, small = expect(2048, "off"), expect(512, "on")
    assert big["fits"] is False and small["fits"] is True  # the planner's verdicts this test is written around
    browser.get(studio["url"] + "/#plan")
    wait_for(lambda: all_css(browser, "#plan-model option[value='llama-3.1-8b']"), what="the model list")
    assert css(browser, "#plan-model").get_attribute("value") == "llama-3.1-8b"  # the page's default choice

    fill_plan(browser, "2048", "off")
    assert verdict_after(None) == "does not fit"
    assert "nofit" in css(browser, "#plan-verdict").get_attribute("class").split()
    assert "over" in css(browser, "#plan-bar").get_attribute("class").split()
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731 - as the page writes sizes
    assert css(browser, "#plan-total").text.strip() == f"{gib(big['total_bytes'])} of {gib(big['vram_bytes'])}"
    assert f"longest sequence that fits: {big['longest_seq']:,} tokens" in css(browser, "#plan-longest").text
    assert len(all_css(browser, "#plan-bar .plan-part")) == len(big["parts"])
    assert css(browser, "#plan-bar .plan-vram").is_displayed()
    assert css(browser, "#plan-text").get_attribute("textContent") == big["text"]
    shot(browser, "plan")

    fill_plan(browser, "512", "on")
    assert verdict_after("does not fit") == "fits"
    assert "fits" in css(browser, "#plan-verdict").get_attribute("class").split()
    assert "over" not in css(browser, "#plan-bar").get_attribute("class").split()
    assert css(browser, "#plan-total").text.strip() == f"{gib(small['total_bytes'])} of {gib(small['vram_bytes'])}"
    assert len(all_css(browser, "#plan-bar .plan-part")) == len(small["parts"])  # redrawn, not appended to
    shot(browser, "plan-fits")

    css(browser, "#plan-vram").clear()
    css(browser, "#plan-vram").send_keys("lots")
    css(browser, "#plan-go").click()
    error = wait_for(lambda: css(browser, '#screen-plan .field-error[data-field="vram"]').text.strip(), what="error")
    assert "vram" in error and "lots" in error
    assert "has-error" in css(browser, "#plan-vram").get_attribute("class").split()
    assert css(browser, "#plan-verdict").text.strip() == "fits"  # the last good plan stays
    assert not console_errors(browser)


# ---------------------------------------------------------------- the real embedded SmolLM2


@pytest.fixture(scope="module")
def smollm2_studio(tmp_path_factory):
    """A project with VADER movie data (400 training and 24 held-out reviews) and the studio serving it: the shipped
    smollm2_sentiment config runs as it is but for the form's values."""
    from qtune.serve.app import ServerThread
    from qtune.studio.app import create_studio_app
    from qtune.studio.common import Studio

    source = ROOT / "data" / "vader_movies"
    if not (source / "train.jsonl").is_file():
        pytest.skip("no VADER data: `make data` prepares it")
    project = tmp_path_factory.mktemp("smollm2-project").resolve()
    (project / "data" / "vader_movies").mkdir(parents=True)
    # The first 400 training reviews (tokenizing all 9,672 takes longer than the 6 steps) and 24 held-out ones.
    for name, rows in (("train.jsonl", 400), ("test.jsonl", 24)):
        head = (source / name).read_text().splitlines(keepends=True)[:rows]
        (project / "data" / "vader_movies" / name).write_text("".join(head))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QTUNE_HOME", str(tmp_path_factory.mktemp("qtune-home")))
        mp.chdir(project)
        studio = Studio(project=project, dir=project / "adapters", quant="nf4", dtype="fp32")
        studio.dir.mkdir()
        with ServerThread(create_studio_app(studio)) as url:
            yield {"url": url, "studio": studio}


@pytest.mark.integration
def test_smollm2_from_the_shipped_config_to_the_playground(browser, smollm2_studio):
    from selenium.webdriver.support.ui import Select

    url, name = smollm2_studio["url"], "smollm2-studio"
    open_form(browser, url, "shipped:smollm2_sentiment.yaml")
    # fp32 compute: bf16 matmuls are slow on a CPU; a few steps, the held-out loss every 3.
    for key, value in [("output.name", name), ("model.dtype", "fp32"), ("train.max_steps", "6")]:
        if key == "model.dtype":
            Select(css(browser, f'#run-form [name="{key}"]')).select_by_value(value)
        else:
            set_field(browser, key, value)
    for key, value in [("train.batch_size", "4"), ("train.eval_every", "3"), ("train.save_every", "3")]:
        set_field(browser, key, value)
    css(browser, "#run-start").click()
    wait_for(lambda: all_css(browser, f'#runs-list .run[data-name="{name}"]'), what="the run in the list")
    css(browser, f'#runs-list .run[data-name="{name}"]').click()
    first = wait_for(
        lambda: chart_points(browser, "#run-detail svg.loss-chart path.train-loss"), timeout=300, what="a loss point"
    )
    wait_for(
        lambda: chart_points(browser, "#run-detail svg.loss-chart path.train-loss") > first,
        timeout=300,
        what="the loss curve to grow",
    )
    shot(browser, "smollm2-runs-live")
    wait_for(lambda: run_state(browser, name) == "finished", timeout=600, what="the SmolLM2 run to finish")
    shot(browser, "smollm2-runs")

    browser.get(url + "/#adapters")
    wait_for(lambda: all_css(browser, f'#adapters-list .adapter[data-name="{name}"]'), what="the adapter")
    css(browser, f'#adapters-list .adapter[data-name="{name}"]').click()
    metrics = wait_for(lambda: css(browser, "#adapter-metrics").text.strip(), what="the held-out metrics")
    assert "accuracy" in metrics
    shot(browser, "smollm2-adapters")

    browser.get(url + "/#playground")
    state = wait_for(lambda: css(browser, "#pg-state").text.strip(), what="the playground's state")
    if state != "ready":
        css(browser, "#pg-load").click()
    wait_for(lambda: all_css(browser, f"#pg-models input[value='{name}']"), timeout=300, what="SmolLM2 to load")
    for model in ("base", name):
        box = css(browser, f"#pg-models input[value='{model}']")
        if not box.is_selected():
            box.click()
    review = "Review: A joy from start to finish, with a cast that clearly loved every minute.\n"
    css(browser, "#pg-prompt").send_keys(review + "Is this movie review positive or negative?")
    css(browser, "#pg-send").click()
    answers = {}
    for model in ("base", name):
        wait_for(
            lambda m=model: css(browser, f'.pg-answer[data-model="{m}"]').get_attribute("data-done") == "true",
            timeout=300,
            what=f"{model}'s answer",
        )
        answers[model] = css(browser, f'.pg-answer[data-model="{model}"] .pg-text').text.strip()
    assert all(answers.values()), answers
    # The adapter answers with its own system prompt (one word), shown above its column.
    assert "one word" in css(browser, f'.pg-answer[data-model="{name}"]').text
    shot(browser, "smollm2-playground")

    browser.get(url + "/#plan")
    wait_for(lambda: all_css(browser, "#plan-model option[value='llama-3.1-8b']"), what="the model list")
    Select(css(browser, "#plan-model")).select_by_value("llama-3.1-8b")
    Select(css(browser, "#plan-checkpointing")).select_by_value("on")
    css(browser, "#plan-go").click()
    # the page's defaults (12GB, seq 2048) with checkpointing on: about 9.7 GiB, so it fits
    assert wait_for(lambda: css(browser, "#plan-verdict").text.strip(), what="the verdict") == "fits"
    shot(browser, "smollm2-plan")
    assert not console_errors(browser)
