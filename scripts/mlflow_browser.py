"""The MLflow UI in headless Chromium: what the browser test drives, and the README's screenshots of a sweep.

    python scripts/mlflow_browser.py --tracking-uri sqlite:///runs/mlflow.db --sweep PARENT_RUN_ID --out docs/NAME

opens the sweep's runs page with its trials unfolded and its compare view (swept keys only), and saves
NAME-runs.png and NAME-compare.png. Needs Debian's chromium and chromium-driver (`bash scripts/system_deps.sh
test`) and selenium (the `[dev]` extras)."""

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def mlflow_server(tracking_uri: str, log_file: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 over `tracking_uri`, on a free port: its base URL once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_bin), "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    with log_file.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start:\n{log_file.read_text()}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium WebDriver, 1600x1000."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise RuntimeError("no chromium or chromedriver: run bash scripts/system_deps.sh test")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_shows(driver, *texts: str, timeout: float = 90) -> str:
    """The page's text once it holds every one of `texts` (the UI renders after its API calls return)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    return driver.find_element(By.TAG_NAME, "body").text


def close_assistant(driver) -> None:
    """MLflow 3's assistant panel opens with every page and hides half of it."""
    from selenium.webdriver.common.by import By

    for close in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        close.click()


def compare_table(driver) -> dict[str, list[str]]:
    """The compare page's tables as {row heading: one cell per run}, in the page's run order."""
    from selenium.webdriver.common.by import By

    rows = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "tr"):
        if heading := tr.find_elements(By.CSS_SELECTOR, "th[scope='row']"):
            cells = tr.find_elements(By.TAG_NAME, "td")
            rows[heading[0].get_attribute("textContent").strip()] = [
                td.get_attribute("textContent").strip() for td in cells]
    return rows


def show_sweep_runs(driver, url: str, experiment: str, sweep_name: str, trial_names: list[str]) -> None:
    """The experiment's runs page with the sweep's row unfolded to its trials."""
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/#/experiments/{experiment}/runs")
    page_shows(driver, sweep_name)
    close_assistant(driver)
    driver.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    page_shows(driver, *trial_names)


def show_compare(driver, url: str, experiment: str, run_ids: list[str], *texts: str) -> None:
    """The compare view of `run_ids`, once it shows `texts`."""
    driver.get(f"{url}/#/compare-runs?runs={json.dumps(run_ids)}&experiments={json.dumps([experiment])}")
    page_shows(driver, f"Comparing {len(run_ids)} Runs", *texts)
    close_assistant(driver)


def show_diff_only(driver, swept_key: str) -> None:
    """Parameters: only those that differ between the runs, scrolled to `swept_key`."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']").click()
    row = driver.find_element(By.XPATH, f"//th[normalize-space()='{swept_key}']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)


def main() -> None:
    import mlflow

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--sweep", required=True, help="the sweep's parent run id")
    parser.add_argument("--out", required=True, help="path prefix of the two PNGs")
    args = parser.parse_args()
    client = mlflow.MlflowClient(args.tracking_uri)
    parent = client.get_run(args.sweep)
    experiment = parent.info.experiment_id
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                order_by=["attributes.start_time ASC"])
    # The sweep's run holds each swept key's distribution, e.g. grid[curriculum, rb, ...]
    swept = [k for k, v in parent.data.params.items()
             if v.startswith(("grid[", "choice[", "uniform[", "loguniform[", "randint[", "quniform["))]
    names = [t.info.run_name for t in trials]
    out = Path(args.out)
    with mlflow_server(args.tracking_uri, out.parent / f"{out.name}-server.log") as url, chromium() as driver:
        show_sweep_runs(driver, url, experiment, parent.info.run_name, names)
        driver.save_screenshot(f"{out}-runs.png")
        show_compare(driver, url, experiment, [parent.info.run_id, *(t.info.run_id for t in trials)], *names)
        show_diff_only(driver, sorted(swept)[0])
        driver.save_screenshot(f"{out}-compare.png")
    (out.parent / f"{out.name}-server.log").unlink()
    print(f"saved {out}-runs.png and {out}-compare.png ({len(trials)} trials; swept: {', '.join(sorted(swept))})")


if __name__ == "__main__":
    main()
