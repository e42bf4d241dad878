// End-to-end test of the web console in a real browser (Debian's chromium, headless, driven by
// playwright-core; nothing is downloaded).
//
//   GV_URL=https://127.0.0.1:PORT GV_API_KEY=gv_... GV_TEMPLATE=NAME GV_SCENARIO=container \
//     node web/e2e/console.mjs
//   GV_SCENARIO=vm GV_VM_ID=ID ...  (a running VM whose serial console shows a login prompt)
//   GV_EXPECT_GPU_EVENT=KIND ...  (container: the GPUs page must list an event of KIND, e.g. thermal)
//
// Optional: GV_SHOTS=DIR (a PNG of each page), CHROMIUM=/path/to/chromium (default
// /usr/bin/chromium). Prints each step as it passes; exits non-zero with the reason on the first
// failure, on any console error of the page and on any Content-Security-Policy violation.
import { chromium } from 'playwright-core';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';

const env = process.env;
const URL0 = (env.GV_URL ?? '').replace(/\/+$/, '');
const KEY = env.GV_API_KEY ?? '';
const SCENARIO = env.GV_SCENARIO ?? 'container';
const TEMPLATE = env.GV_TEMPLATE ?? '';
const VM_ID = env.GV_VM_ID ?? '';
const SHOTS = env.GV_SHOTS ?? '';
/** A kind of GPU event (`thermal`, `xid`, …) the GPUs page must list: set where the test made one. */
const EXPECT_GPU_EVENT = env.GV_EXPECT_GPU_EVENT ?? '';
const CHROMIUM = env.CHROMIUM ?? '/usr/bin/chromium';

const t0 = Date.now();
const stamp = () => `${((Date.now() - t0) / 1000).toFixed(1).padStart(6)}s`;
const ok = (msg) => console.log(`${stamp()} ok   ${msg}`);
const info = (msg) => console.log(`${stamp()}      ${msg}`);
class Failure extends Error {}
const fail = (msg) => {
  throw new Failure(msg);
};

function need(name, v) {
  if (!v) {
    console.error(`console e2e: ${name} is not set`);
    process.exit(2);
  }
}
need('GV_URL', URL0);
need('GV_API_KEY', KEY);
if (SCENARIO === 'container') need('GV_TEMPLATE', TEMPLATE);
else if (SCENARIO === 'vm') need('GV_VM_ID', VM_ID);
else {
  console.error(`console e2e: GV_SCENARIO must be container or vm, not ${JSON.stringify(SCENARIO)}`);
  process.exit(2);
}

const require = createRequire(import.meta.url);
const AXE_SOURCE = readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');

/** Console errors and CSP violations of every page, and what is allowed among them. */
const problems = [];
/** Substrings of console errors the test expects (set around the steps that cause them). */
const expected = new Set();

async function shot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  info(`screenshot ${join(SHOTS, `${name}.png`)}`);
}

/** axe-core on the page as it is now: fails on a serious or critical violation. The CSP
 * refuses an injected <script> (page.addScriptTag puts the file inline), so axe's source is
 * evaluated through the DevTools protocol (page.evaluate), which the page's CSP does not govern. */
async function axe(page, name) {
  const loaded = await page.evaluate(() => typeof window.axe === 'object');
  if (!loaded) await page.evaluate(`${AXE_SOURCE}\n;void 0`);
  const result = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ['violations'] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.slice(0, 5).map((n) => n.target.join(' ')) }));
  });
  const bad = result.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  for (const v of result.filter((v) => !bad.includes(v))) info(`axe (${name}): ${v.impact} ${v.id}: ${v.help} [${v.nodes.join(', ')}]`);
  if (bad.length) {
    fail(`axe on the ${name} page: ${bad.length} serious or critical violations:\n` + bad.map((v) => `  ${v.impact} ${v.id}: ${v.help}\n    at ${v.nodes.join('\n    at ')}`).join('\n'));
  }
  ok(`axe: no serious or critical violation on the ${name} page (${result.length} minor)`);
}

async function waitFor(what, fn, timeoutMs, everyMs = 250) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) fail(`timed out after ${timeoutMs / 1000} s waiting for ${what}${last instanceof Error ? ` (${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Navigates to `url`. Chromium aborts a navigation with net::ERR_NETWORK_CHANGED when the
 * host's interfaces change (instances add veths and taps): that is the transport's, not the
 * page's, so the navigation is tried again (printed), up to five times. */
async function goto(page, url) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await page.goto(url);
    } catch (e) {
      if (attempt >= 5 || !String(e?.message ?? e).includes('net::ERR_NETWORK_CHANGED')) throw e;
      info(`navigation to ${url} aborted by a host network change (net::ERR_NETWORK_CHANGED); again (${attempt})`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

async function login(page) {
  await goto(page, `${URL0}/`);
  await page.getByLabel('API key').waitFor({ timeout: 20000 });
  ok('login page shown');
  await axe(page, 'login');
  await shot(page, 'login');
  await page.getByLabel('API key').fill(KEY);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('navigation', { name: 'Main' }).waitFor({ timeout: 20000 });
  await page.getByRole('heading', { name: 'Instances', level: 1 }).waitFor({ timeout: 20000 });
  ok(`logged in as ${await page.getByTestId('who').innerText()}`);
}

async function terminalText(page, testid) {
  return page.evaluate((id) => document.querySelector(`[data-testid="${id}"]`)?.gvText?.() ?? '', testid);
}

async function containerScenario(page) {
  const name = `e2e-${Date.now().toString(36)}`;
  // --- create, first with an invalid field -------------------------------------------------
  await page.getByTestId('create-toggle').click();
  const form = page.getByTestId('create-form');
  await form.waitFor();
  await waitFor(`template ${TEMPLATE} in the template picker`, () => page.locator(`#cf-template option[value="${TEMPLATE}"]`).count(), 15000);
  await form.getByLabel('Template').selectOption(TEMPLATE);
  await form.getByLabel('Name').fill(name);
  await form.getByLabel('Memory').fill('lots');
  expected.add('status of 400');
  const [bad] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/v1/instances') && r.request().method() === 'POST'),
    form.getByTestId('create-submit').click(),
  ]);
  const badBody = await bad.json().catch(() => null);
  if (bad.status() < 400 || !badBody?.error?.message) fail(`memory "lots" was not refused by the API (status ${bad.status()})`);
  const fieldErr = page.getByTestId('error-memory');
  await fieldErr.waitFor({ timeout: 5000 }).catch(() => fail(`the API's error (${badBody.error.message}) is not shown next to the memory field`));
  const shown = await fieldErr.innerText();
  if (shown.trim() !== badBody.error.message.trim()) fail(`the memory field shows ${JSON.stringify(shown)}, not the API's message ${JSON.stringify(badBody.error.message)}`);
  const describedBy = await form.getByLabel('Memory').getAttribute('aria-describedby');
  if (!describedBy?.includes('cf-memory-error')) fail('the memory field is not described by its error');
  ok(`invalid form: the API's error is shown next to the memory field: "${shown}"`);
  await shot(page, 'create-form-error');
  await axe(page, 'instances (create form)');

  await form.getByLabel('Memory').fill('');
  const [created] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/v1/instances') && r.request().method() === 'POST'),
    form.getByTestId('create-submit').click(),
  ]);
  const inst = await created.json().catch(() => null);
  if (created.status() !== 201 || !inst?.id) fail(`create from template ${TEMPLATE} failed: ${created.status()} ${JSON.stringify(inst)}`);
  expected.delete('status of 400');
  ok(`created ${name} (${inst.id}) from template ${TEMPLATE} through the form`);

  // --- see it running in the list ----------------------------------------------------------
  const row = page.locator(`[data-testid="instance-row"][data-id="${inst.id}"]`);
  await row.waitFor({ timeout: 10000 });
  await waitFor(`${inst.id} to be running in the list`, async () => (await row.getAttribute('data-state')) === 'running', 180000, 500);
  ok(`${name} is running in the list`);
  await shot(page, 'instances');
  await axe(page, 'instances');

  // --- its page: graphs, terminal -----------------------------------------------------------
  await row.getByRole('link', { name }).click();
  await page.getByTestId('instance-page').waitFor({ timeout: 10000 });
  ok(`instance page of ${name} open`);
  const chart = page.getByTestId('chart-gpu-util');
  const read = async () => ({ n: Number(await chart.getAttribute('data-points')), last: Number(await chart.getAttribute('data-last')) });
  const first = await waitFor('points in the GPU utilisation graph (does the template give the instance a GPU?)', async () => {
    const r = await read();
    return r.n > 0 ? r : null;
  }, 90000, 500);
  const later = await waitFor('new points in the GPU utilisation graph', async () => {
    const r = await read();
    return r.last > first.last ? r : null;
  }, 20000, 500);
  await page.waitForTimeout(3000);
  const after = await read();
  if (!(after.last > later.last)) fail(`the GPU utilisation graph stopped getting points (last at ${later.last}, still ${after.last} 3 s later)`);
  ok(`GPU utilisation graph gets new points: ${first.n} points (last t=${first.last}), then ${after.n} (last t=${after.last}, +${((after.last - first.last) / 1000).toFixed(0)} s)`);
  // The newest points come over the metrics WebSocket, not from polling the history.
  const stream = await page.getByTestId('metrics').getAttribute('data-stream');
  if (stream !== 'open') fail(`the metrics stream (/v1/instances/${inst.id}/metrics/ws) is not open: the metrics section's data-stream is ${JSON.stringify(stream)}`);
  ok('the graphs are fed by the metrics stream (data-stream="open")');

  await page.getByTestId('exec-open').click();
  await waitFor('the terminal to connect', async () => (await page.getByTestId('exec-status').getAttribute('data-state')) === 'open', 30000);
  ok('terminal connected (exec WebSocket)');
  await page.getByTestId('exec-terminal').click();
  // The shell's prompt first, so that the typed line is not lost in its start-up.
  await waitFor('a shell prompt in the terminal', async () => (await terminalText(page, 'exec-terminal')).trim().length > 0, 15000).catch(() => info('no prompt seen; typing anyway'));
  await page.keyboard.type('echo hi');
  await page.keyboard.press('Enter');
  await waitFor('"hi" in the terminal', async () => (await terminalText(page, 'exec-terminal')).split('\n').some((l) => l.trim() === 'hi'), 15000);
  ok('typed "echo hi" in the terminal and read "hi" back');
  await shot(page, 'instance');
  await axe(page, 'instance');

  // --- resize it live (a running container's memory changes in place) ------------------------
  await page.getByRole('button', { name: 'Resize', exact: true }).first().click();
  const resize = page.getByTestId('resize-dialog');
  await resize.waitFor({ timeout: 5000 });
  await resize.getByLabel('Memory').fill('192MiB');
  await resize.getByRole('button', { name: 'Resize', exact: true }).click();
  await resize.waitFor({ state: 'detached', timeout: 30000 });
  const resized = await page.evaluate(async (id) => (await fetch(`/v1/instances/${id}`)).json(), inst.id);
  if (resized.memory !== 192 * 2 ** 20) fail(`after the resize dialog the API says memory=${resized.memory}, not 192 MiB`);
  ok(`resized ${name} to 192 MiB through the dialog (the API answers memory=${resized.memory})`);

  // --- stop, terminate ---------------------------------------------------------------------
  const pageState = () => page.getByTestId('instance-page').getAttribute('data-state');
  await page.getByTestId('stop').click();
  await waitFor(`${name} to be stopped`, async () => (await pageState()) === 'stopped', 120000, 500);
  ok(`${name} stopped`);
  await page.getByTestId('terminate').click();
  await page.getByTestId('confirm-terminate').click();
  await page.getByRole('heading', { name: 'Instances', level: 1 }).waitFor({ timeout: 10000 });
  await waitFor(`${name} to be gone from the list`, async () => (await page.locator(`[data-testid="instance-row"][data-id="${inst.id}"]`).count()) === 0, 120000, 500);
  ok(`${name} terminated: gone from the list`);

  // --- the other pages -----------------------------------------------------------------------
  for (const [hash, title, ready] of [
    ['#/gpus', 'GPUs', 'gpus-table'],
    ['#/endpoints', 'Endpoints', null],
    ['#/usage', 'Usage', 'usage-total'],
  ]) {
    await goto(page, `${URL0}/${hash}`);
    await page.getByRole('heading', { name: title, level: 1 }).waitFor({ timeout: 10000 });
    if (ready) await page.getByTestId(ready).waitFor({ timeout: 15000 });
    else await page.waitForSelector('[data-testid="endpoints-table"], [data-testid="no-endpoints"], .error', { timeout: 15000 });
    ok(`${title} page shown`);
    if (hash === '#/gpus') {
      // The daemon's host preflight: the kernel check is always there, with its verdict.
      const kernel = page.locator('[data-testid="host-checks"] tr[data-check="kernel"]');
      await kernel.waitFor({ timeout: 30000 });
      const verdict = (await kernel.locator('.badge').innerText()).trim();
      if (!['pass', 'warn', 'fail', 'skip'].includes(verdict)) fail(`the kernel host check shows ${JSON.stringify(verdict)}`);
      ok(`host checks shown (kernel: ${verdict}, ${await page.locator('[data-testid="host-checks"] tbody tr').count()} checks)`);
      // Cordon a GPU with a reason through the dialog: shown on its row and as an event; then
      // lift it the same way.
      const gpuRow = page.locator('[data-testid="gpu-row"]').nth(1);
      const cordonButton = gpuRow.getByRole('button', { name: /^Cordon GPU/ });
      if ((await cordonButton.count()) !== 1) fail('no Cordon button on the second GPU row (the e2e logs in as an admin)');
      const label = await cordonButton.getAttribute('aria-label');
      await cordonButton.click();
      const cd = page.getByTestId('cordon-dialog');
      await cd.getByLabel('Reason').fill('e2e maintenance');
      await cd.getByRole('button', { name: 'Cordon', exact: true }).click();
      const reason = gpuRow.getByTestId('cordon-reason');
      await waitFor('the cordon and its reason on the GPU row', async () => (await reason.count()) > 0 && (await reason.innerText()).includes('e2e maintenance'), 15000);
      const eventRow = (kind) => page.locator(`[data-testid="gpu-events"] tr[data-kind="${kind}"]`);
      await waitFor('a cordoned event in the GPU events table', async () => (await eventRow('cordoned').count()) > 0, 15000, 500);
      await gpuRow.getByRole('button', { name: /^Uncordon GPU/ }).click();
      await waitFor('the cordon lifted on the GPU row', async () => (await reason.count()) === 0, 15000);
      await waitFor('an uncordoned event in the GPU events table', async () => (await eventRow('uncordoned').count()) > 0, 15000, 500);
      ok(`${label?.replace(/^Cordon /, '')}: cordoned with a reason through the dialog (on its row and in the events), then uncordoned`);
      if (EXPECT_GPU_EVENT) {
        const sel = `[data-testid="gpu-events"] tr[data-kind="${EXPECT_GPU_EVENT}"]`;
        await waitFor(`a ${EXPECT_GPU_EVENT} event in the GPU events table`, async () => (await page.locator(sel).count()) > 0, 30000, 500);
        const row = page.locator(sel).first();
        ok(`GPU event listed: ${(await row.innerText()).replace(/\s+/g, ' ').trim()}`);
      }
    }
    await shot(page, title.toLowerCase());
    await axe(page, title);
  }

  // --- 500 instances -------------------------------------------------------------------------
  await render500(page);
}

/** The list page with 500 (synthetic) instances: the time from the route change to the 500th
 * row in the DOM, measured in the page. Printed, not asserted. */
async function render500(page) {
  const base = Date.now() - 86400e3;
  const rows = Array.from({ length: 500 }, (_, i) => ({
    id: `i-${(0x10000000 + i).toString(16)}`,
    name: `bulk-${String(i).padStart(3, '0')}`,
    tenant: 'default',
    image: 'busybox',
    state: ['running', 'stopped', 'provisioning', 'failed'][i % 4],
    desired: 'running',
    runtime: i % 5 === 0 ? 'vm' : 'container',
    vcpus: 1 + (i % 8),
    cpus: [i % 2],
    memory: 2 ** 30 * (1 + (i % 16)),
    container_disk: 10 * 2 ** 30,
    gpus: i % 3 === 0 ? [] : [{ uuid: `GPU-bulk-${i % 3}`, index: i % 3, model: 'A100-80GB', milli: i % 3 === 1 ? 250 : 1000, vram: (i % 3 === 1 ? 20 : 80) * 2 ** 30 }],
    volumes: [],
    env: [],
    ports: [],
    command: [],
    created_at: base + i * 1000,
    updated_at: base + i * 1000,
  }));
  const body = JSON.stringify(rows);
  await goto(page, `${URL0}/#/usage`);
  await page.getByRole('heading', { name: 'Usage', level: 1 }).waitFor();
  await page.route('**/v1/instances', (route) =>
    route.request().method() === 'GET' ? route.fulfill({ status: 200, contentType: 'application/json', body }) : route.continue(),
  );
  const figures = [];
  for (let run = 0; run < 3; run++) {
    await page.evaluate(() => {
      delete window.__gv500;
      const start = performance.now();
      const obs = new MutationObserver(() => {
        if (document.querySelectorAll('[data-testid="instance-row"]').length >= 500) {
          obs.disconnect();
          window.__gv500 = { total: performance.now() - start, app: window.__gvInstancesRendered };
        }
      });
      obs.observe(document.getElementById('app'), { childList: true, subtree: true });
      location.hash = '#/instances';
    });
    const r = await page.waitForFunction(() => window.__gv500, null, { timeout: 20000 }).then((h) => h.jsonValue());
    const renderOnly = r.app ? r.app.renderedAt - r.app.dataAt : NaN;
    figures.push({ total: r.total, render: renderOnly });
    info(`500 instances, run ${run + 1}: ${r.total.toFixed(1)} ms from the route change to the 500th row (${renderOnly.toFixed(1)} ms of it rendering the answer)`);
    await page.evaluate(() => (location.hash = '#/usage'));
    await page.getByRole('heading', { name: 'Usage', level: 1 }).waitFor();
  }
  await page.unroute('**/v1/instances');
  const best = figures.reduce((a, b) => (b.total < a.total ? b : a));
  ok(`RENDER 500 INSTANCES: ${best.total.toFixed(1)} ms route change → 500th row (render ${best.render.toFixed(1)} ms; best of 3)`);
}

async function vmScenario(page) {
  await goto(page, `${URL0}/#/instances/${encodeURIComponent(VM_ID)}`);
  const ip = page.getByTestId('instance-page');
  await ip.waitFor({ timeout: 20000 });
  if ((await ip.getAttribute('data-runtime')) !== 'vm') fail(`${VM_ID} is not a VM`);
  await waitFor(`${VM_ID} to be running`, async () => (await ip.getAttribute('data-state')) === 'running', 60000, 500);
  ok(`VM ${VM_ID} page open, running`);
  await page.getByTestId('console-open').click();
  await waitFor('the serial console to connect', async () => (await page.getByTestId('console-status').getAttribute('data-state')) === 'open', 30000);
  ok('serial console connected (console WebSocket)');
  await page.getByTestId('console-terminal').click();
  // A getty prints its prompt again on Enter: ask every 5 s until it shows.
  let lastEnter = 0;
  await waitFor('"login:" on the serial console', async () => {
    if ((await terminalText(page, 'console-terminal')).includes('login:')) return true;
    if (Date.now() - lastEnter > 5000) {
      lastEnter = Date.now();
      await page.keyboard.press('Enter');
    }
    return false;
  }, 60000, 500);
  ok('read "login:" on the serial console');
  await shot(page, 'vm-serial-console');
  await axe(page, 'VM instance');
  await page.getByTestId('console-close').click();

  // The graphical console: noVNC over the daemon's VNC WebSocket (vnc/ws).
  await page.getByTestId('vnc-open').click();
  const state = await waitFor('the graphical console to connect or fail', async () => {
    const s = await page.getByTestId('vnc-status').getAttribute('data-state');
    return s === 'connected' || s === 'error' || s === 'disconnected' ? s : null;
  }, 30000);
  if (state !== 'connected') {
    fail(`the graphical console did not connect: ${await page.getByTestId('vnc-status').innerText()}`);
  }
  await waitFor('the VNC canvas', async () => (await page.getByTestId('vnc-screen').locator('canvas').count()) > 0, 10000);
  // The guest's screen was drawn: the canvas has a size and some pixels that are not black.
  await waitFor('the guest screen drawn on the canvas', async () => page.getByTestId('vnc-screen').locator('canvas').evaluate((c) => {
    if (!c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) return true;
    return false;
  }), 20000, 500);
  ok('graphical console connected and drawn (noVNC over the VNC WebSocket)');
  await shot(page, 'vm-graphical-console');
  await axe(page, 'VM graphical console');
  await page.getByTestId('vnc-close').click();
}

async function main() {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
  try {
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1360, height: 900 } });
    // CSP violations, reported by the page itself (this init script runs outside the page's CSP).
    await context.addInitScript(() => {
      document.addEventListener('securitypolicyviolation', (e) => {
        console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || 'inline'} at ${e.sourceFile}:${e.lineNumber} (${e.sample || ''})`);
      });
    });
    const page = await context.newPage();
    page.on('console', (m) => {
      if (m.type() !== 'error') return;
      const text = m.text();
      // API answers of 4xx are the page's business (401 before login, 400 of the invalid form,
      // 404 of a terminated instance): it shows them. Everything else counts.
      if (/Failed to load resource: the server responded with a status of 4\d\d/.test(text) && !text.includes('CSP')) return;
      if ([...expected].some((s) => text.includes(s))) return;
      // Chromium aborts the requests in flight when the host's network changes, and making
      // an instance adds interfaces to the host (its veth, a VM's tap; the other tests' too):
      // the browser's transport, not the page, which polls again. Counted and printed.
      if (text.includes('net::ERR_NETWORK_CHANGED')) {
        info(`(host network changed under the browser: ${m.location().url})`);
        return;
      }
      problems.push(`console error: ${text} (${m.location().url}:${m.location().lineNumber})`);
    });
    page.on('pageerror', (e) => problems.push(`uncaught exception: ${e.message}`));
    await login(page);
    if (SCENARIO === 'container') await containerScenario(page);
    else await vmScenario(page);
    await page.getByTestId('logout').click();
    await page.getByLabel('API key').waitFor({ timeout: 10000 });
    const after = await page.evaluate(() => fetch('/v1/sessions/current', { credentials: 'same-origin' }).then((r) => r.status));
    if (after !== 401) fail(`after logout the session still answers ${after}`);
    ok('logged out (the session answers 401)');
    if (problems.length) fail(`${problems.length} console errors or CSP violations:\n  ${problems.join('\n  ')}`);
    ok('no console error, no CSP violation');
  } finally {
    await browser.close();
  }
}

main().then(
  () => {
    console.log(`console e2e (${SCENARIO}): passed in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  },
  (e) => {
    console.error(`\nconsole e2e (${SCENARIO}): FAILED: ${e instanceof Failure ? e.message : e.stack ?? e}`);
    if (problems.length && !(e instanceof Failure && e.message.includes('console errors'))) console.error(`also seen:\n  ${problems.join('\n  ')}`);
    process.exit(1);
  },
);
