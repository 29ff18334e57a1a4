// The admin port's status page in Debian's Chromium (headless, playwright-core), against
// `tern dev`'s three regions with real ably-js traffic: what the page renders is checked
// against the same node's /metrics and /regions, and a screenshot is taken: into
// target/status-page.png, or with UPDATE_SCREENSHOT=1 into docs/status-page.png (the one
// README shows), so a test run does not rewrite a tracked file.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import Ably from 'ably';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..', '..');
const ternBin = process.env.TERN_BIN || join(repo, 'target', 'debug', 'tern');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const KEY = 'dev.root:dev-secret-change-me';
const SCREENSHOT = process.env.UPDATE_SCREENSHOT === '1'
  ? join(repo, 'docs', 'status-page.png')
  : join(repo, 'target', 'status-page.png');

let dev;
let browser;
const clients = [];

/// `tern dev --port 0` in a scratch folder; resolves with its client and admin ports.
function startDev() {
  const dir = mkdtempSync(join(tmpdir(), 'tern-status-'));
  const child = spawn(ternBin, ['dev', '--port', '0'], {
    cwd: dir,
    // INFO, so refused requests reach the page's recent panel; the log itself is not needed.
    stdio: ['ignore', 'pipe', 'ignore'],
    env: { ...process.env, TERN_LOG: 'info' },
  });
  return new Promise((resolveDev, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('tern dev did not start in 30 s')), 30000);
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const ports = [...out.matchAll(/listening on http:\/\/127\.0\.0\.1:(\d+)/g)].map((m) => Number(m[1]));
      const admins = [...out.matchAll(/tern admin on http:\/\/127\.0\.0\.1:(\d+)/g)].map((m) => Number(m[1]));
      if (ports.length === 3) {
        clearTimeout(timer);
        resolveDev({ child, ports, admins });
      }
    });
    child.on('exit', (code) => reject(new Error(`tern dev exited ${code}`)));
  });
}

/// The sum of `name`'s samples whose labels include `labels`.
function total(text, name, labels = {}) {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((l) => [l[1], l[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) sum += Number(m[3]);
  }
  return sum;
}

function client(port) {
  const c = new Ably.Realtime({
    key: KEY, endpoint: '127.0.0.1', port, tls: false,
    disableConnectivityCheck: true, fallbackHosts: [], logLevel: 0, useBinaryProtocol: false,
  });
  clients.push(c);
  return c;
}

before(async () => {
  dev = await startDev();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  for (const c of clients) c.close();
  await browser?.close();
  dev?.child.kill('SIGTERM');
});

test('the status page shows what the node\'s /metrics and /regions say, and refreshes itself', async () => {
  const [admin] = dev.admins;
  assert.equal(dev.admins.length, 3, 'every region prints its admin (status page) URL');
  // Traffic: three subscribers on us-east, one on eu-west, 12 messages published on
  // us-east, so every panel has something to show.
  const channelName = `status-${Date.now()}`;
  const subscribers = [client(dev.ports[0]), client(dev.ports[0]), client(dev.ports[0]), client(dev.ports[1])];
  const seen = subscribers.map(() => []);
  for (const [i, c] of subscribers.entries()) await c.channels.get(channelName).subscribe((m) => seen[i].push(m.data));
  const publisher = subscribers[0].channels.get(channelName);
  for (let i = 0; i < 12; i++) await publisher.publish('n', `m${i}`);
  const deadline = Date.now() + 10000;
  while (!seen.every((s) => s.length === 12)) {
    assert.ok(Date.now() < deadline, `deliveries: ${seen.map((s) => s.length)}`);
    await new Promise((r) => setTimeout(r, 50));
  }

  // A refused credential: shown in the recent panel with its Ably code.
  const refused = await fetch(`http://127.0.0.1:${dev.ports[0]}/channels/x/messages`, {
    headers: { authorization: `Basic ${Buffer.from('dev.root:wrong-secret').toString('base64')}` },
  });
  assert.equal(refused.status, 401);
  await refused.arrayBuffer();

  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on('pageerror', (err) => problems.push(err.message));
  page.on('requestfailed', (req) => problems.push(`${req.url()} failed`));
  const external = [];
  page.on('request', (req) => { if (!req.url().startsWith(`http://127.0.0.1:${admin}/`)) external.push(req.url()); });
  await page.goto(`http://127.0.0.1:${admin}/`);
  // Live: the page refreshes on its own (at least three times).
  await page.waitForFunction(() => Number(document.body.dataset.refreshes || 0) >= 3, null, { timeout: 15000 });

  // Nothing changes now, so one refresh shows exactly what a scrape of the same node says.
  const read = () => page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    return {
      node: text('node'), region: text('region'), health: text('health'),
      connTotal: text('conn-total'), ws: text('conn-ws'), comet: text('conn-comet'), sse: text('conn-sse'), mqtt: text('conn-mqtt'),
      channels: text('channels'), published: text('published-total'), nacks: text('nacks'),
      nodes: [...document.querySelectorAll('#regions tr')].map((tr) => tr.dataset.node),
      links: [...document.querySelectorAll('#links tr')].map((tr) => ({
        peer: tr.dataset.peer,
        rtt: tr.querySelector('.rtt').textContent,
        lag: tr.querySelector('.lag').textContent,
        unacked: tr.querySelector('.unacked').textContent,
      })),
      recent: [...document.querySelectorAll('#recent li')].map((li) => li.textContent),
    };
  });
  let shown;
  let expected;
  for (let attempt = 0; ; attempt++) {
    const metrics = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
    expected = {
      connTotal: String(total(metrics, 'tern_connections')),
      ws: String(total(metrics, 'tern_connections', { transport: 'ws' })),
      comet: String(total(metrics, 'tern_connections', { transport: 'comet' })),
      sse: String(total(metrics, 'tern_connections', { transport: 'sse' })),
      mqtt: String(total(metrics, 'tern_connections', { transport: 'mqtt' })),
      channels: String(total(metrics, 'tern_channels')),
      published: String(total(metrics, 'tern_messages_published_total')),
      nacks: String(total(metrics, 'tern_nacks_total')),
      unacked: Object.fromEntries(['tern-dev-eu-west', 'tern-dev-ap-south'].map((p) => [p, String(total(metrics, 'tern_replication_unacked_events', { peer: p }))])),
    };
    await page.waitForFunction((n) => Number(document.body.dataset.refreshes) > n, await page.evaluate(() => Number(document.body.dataset.refreshes)), { timeout: 5000 });
    shown = await read();
    const same = ['connTotal', 'ws', 'comet', 'sse', 'mqtt', 'channels', 'published', 'nacks'].every((k) => shown[k] === expected[k]);
    if (same || attempt >= 5) break;
  }
  assert.equal(shown.node, 'tern-dev-us-east');
  assert.equal(shown.region, 'us-east');
  assert.equal(shown.health, 'healthy');
  for (const k of ['connTotal', 'ws', 'comet', 'sse', 'mqtt', 'channels', 'published', 'nacks']) {
    assert.equal(shown[k], expected[k], `${k} on the page matches /metrics`);
  }
  assert.equal(shown.ws, '3', 'the three us-east subscribers, not eu-west\'s');
  assert.equal(shown.published, '12');

  const regions = await (await fetch(`http://127.0.0.1:${admin}/regions`)).json();
  const nodes = regions.regions.flatMap((r) => r.nodes.map((n) => n.nodeId));
  assert.deepEqual(shown.nodes.slice().sort(), nodes.slice().sort(), 'every live node of /regions is listed');
  assert.equal(shown.nodes.length, 3);

  assert.deepEqual(shown.links.map((l) => l.peer), ['tern-dev-ap-south', 'tern-dev-eu-west'], 'one link per peer');
  for (const link of shown.links) {
    assert.ok(Number(link.rtt) > 0, `RTT to ${link.peer}: ${link.rtt}`);
    assert.ok(Number(link.lag) > 0, `replication lag to ${link.peer}: ${link.lag}`);
    assert.equal(link.unacked, expected.unacked[link.peer], `unacked events to ${link.peer}`);
  }
  assert.ok(shown.recent.some((line) => /REFUSED .*code=401\d\d/.test(line)), `the refused credential is listed: ${shown.recent}`);
  assert.deepEqual(external, [], 'no request leaves the admin port (no external assets)');
  assert.deepEqual(problems, []);

  // For the picture: messages flowing (a bounded 60 publishes, 10 a second), so the rate
  // panels show them.
  let flowing = 0;
  const flow = setInterval(() => { if (flowing++ < 60) publisher.publish('n', `flow${flowing}`).catch(() => {}); }, 100);
  try {
    const at = await page.evaluate(() => Number(document.body.dataset.refreshes));
    await page.waitForFunction((n) => Number(document.body.dataset.refreshes) >= n + 2, at, { timeout: 10000 });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  } finally {
    clearInterval(flow);
  }
  await page.close();
});

test('with an admin token, the browser gets the page by its Basic prompt and the page\'s own requests pass', async () => {
  const token = 'status-token-0123456789';
  const dir = mkdtempSync(join(tmpdir(), 'tern-status-token-'));
  writeFileSync(join(dir, 'tern.toml'), `
[server]
host = "127.0.0.1"
port = 0
server_id = "solo"

[history]
mode = "memory"

[admin]
listen = "127.0.0.1:0"
token = "${token}"

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{"*":["*"]}'
`);
  const child = spawn(ternBin, ['serve', '--config', join(dir, 'tern.toml')], { cwd: dir, stdio: ['ignore', 'pipe', 'ignore'] });
  try {
    const admin = await new Promise((ok, fail) => {
      let out = '';
      child.stdout.on('data', (chunk) => {
        out += chunk;
        const m = /tern admin on http:\/\/127\.0\.0\.1:(\d+)/.exec(out);
        if (m && /listening on/.test(out)) ok(Number(m[1]));
      });
      child.on('exit', (code) => fail(new Error(`tern exited ${code}`)));
    });
    const refused = await fetch(`http://127.0.0.1:${admin}/`);
    assert.equal(refused.status, 401, 'no token, no page');
    assert.match(refused.headers.get('www-authenticate'), /^Basic /, 'a browser is asked for it');
    await refused.arrayBuffer();
    // Chromium without credentials gives up on the challenge.
    const anonymous = await browser.newContext();
    await assert.rejects((await anonymous.newPage()).goto(`http://127.0.0.1:${admin}/`), /ERR_INVALID_AUTH_CREDENTIALS/);
    await anonymous.close();
    const context = await browser.newContext({ httpCredentials: { username: 'admin', password: token } });
    const page = await context.newPage();
    assert.equal((await page.goto(`http://127.0.0.1:${admin}/`)).status(), 200);
    await page.waitForFunction(() => Number(document.body.dataset.refreshes || 0) >= 1, null, { timeout: 10000 });
    assert.equal(await page.textContent('#node'), 'solo');
    assert.equal(await page.textContent('#region'), 'local');
    assert.equal(await page.textContent('#problem'), '', 'status.json and /metrics answered the page');
    assert.equal(await page.locator('#regions tr').count(), 1, 'a single node lists itself');
    await context.close();
  } finally {
    child.kill('SIGTERM');
  }
});
