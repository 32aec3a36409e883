// One page at 1280x800 in Debian's chromium, after its single-page app has rendered (docs/screenshots.py).
// MLflow's UI opens in its GenAI view with an assistant panel: switch to "Model training", close the panel.
const { chromium } = require("playwright-core");

(async () => {
  const [url, out] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox", "--disable-gpu"] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  await page.goto(url);
  await page.waitForTimeout(6000);
  const training = page.getByText("Model training", { exact: true });
  if (await training.count()) {
    await training.first().click(); // kept in the page's local storage: the reload below keeps it
    await page.goto(url);
    await page.waitForTimeout(5000);
  }
  const close = page.locator('[aria-label="Close"]');
  if (await close.count()) await close.first().click();
  await page.waitForTimeout(1500);
  await page.screenshot({ path: out });
  await browser.close();
})();
