// Tern from a real browser: Debian's Chromium, headless, driven by playwright-core. A
// page served from another origin (so CORS is exercised) loads ably-js's browser build
// and talks to a spawned tern, while ably-js in Node publishes over WebSocket.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import Ably from 'ably';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..', '..');
const ternBin = process.env.TERN_BIN || join(repo, 'target', 'debug', 'tern');
const KEY = 'test.root:rootsecret';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const CONFIG = `
[server]
host = "127.0.0.1"
port = 0
cors_allowed_origins = ["*"]

[history]
mode = "memory"

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{"*":["*"]}'
`;

let tern;
let page;
let browser;
let site;
const clients = [];

/// Starts tern; resolves with its port once it prints its listening line.
function startTern() {
  const dir = mkdtempSync(join(tmpdir(), 'tern-browser-'));
  writeFileSync(join(dir, 'tern.toml'), CONFIG);
  const child = spawn(ternBin, ['serve', '--config', join(dir, 'tern.toml'), '--port', '0'], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, TERN_LOG: process.env.TERN_LOG || 'warn' },
  });
  return new Promise((resolvePort, reject) => {
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const match = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (match) resolvePort({ child, port: Number(match[1]) });
    });
    child.on('exit', (code) => reject(new Error(`tern exited ${code}`)));
  });
}

/// Serves the test page and ably-js's browser build from a second origin.
function startSite() {
  const ablyJs = readFileSync(join(here, '..', 'node_modules', 'ably', 'build', 'ably.js'));
  const server = createServer((req, res) => {
    if (req.url === '/ably.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(ablyJs);
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end('<!doctype html><title>tern</title><script src="/ably.js"></script>');
    }
  });
  return new Promise((ok) => server.listen(0, '127.0.0.1', () => ok(server)));
}

before(async () => {
  tern = await startTern();
  site = await startSite();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${site.address().port}/`);
});

after(async () => {
  for (const c of clients) c.close();
  await browser?.close();
  site?.close();
  tern?.child.kill('SIGTERM');
});

function nodeClient() {
  const client = new Ably.Realtime({
    key: KEY, endpoint: '127.0.0.1', port: tern.port, tls: false,
    disableConnectivityCheck: true, fallbackHosts: [], logLevel: 0, useBinaryProtocol: false,
  });
  clients.push(client);
  return client;
}

async function publishAll(channelName, datas) {
  const channel = nodeClient().channels.get(channelName);
  for (const data of datas) await channel.publish('n', data);
}

test('an EventSource in Chromium receives what ably-js publishes (SSE)', async () => {
  // Proves the SSE endpoint works for the browser's own EventSource, cross-origin.
  await page.evaluate(({ port, key }) => {
    window.sseGot = [];
    window.sseOpen = false;
    const source = new EventSource(`http://127.0.0.1:${port}/sse?v=1.2&channels=browser-sse&key=${encodeURIComponent(key)}`);
    source.onopen = () => { window.sseOpen = true; };
    source.onmessage = (event) => window.sseGot.push(JSON.parse(event.data).data);
    window.sseSource = source;
  }, { port: tern.port, key: KEY });
  await page.waitForFunction(() => window.sseOpen, null, { timeout: 10000 });
  const sent = ['one', 'two', 'three'];
  await publishAll('browser-sse', sent);
  await page.waitForFunction((n) => window.sseGot.length >= n, sent.length, { timeout: 10000 });
  assert.deepEqual(await page.evaluate(() => window.sseGot), sent);
  await page.evaluate(() => window.sseSource.close());
});

test('ably-js in Chromium over WebSocket exchanges messages with ably-js in Node', async () => {
  // Proves the browser build of the SDK connects, subscribes and publishes through CORS.
  await page.evaluate(async ({ port, key }) => {
    window.wsGot = [];
    const client = new Ably.Realtime({
      key, endpoint: '127.0.0.1', port, tls: false, disableConnectivityCheck: true,
      fallbackHosts: [], transports: ['web_socket'], useBinaryProtocol: false,
    });
    window.wsClient = client;
    await client.connection.once('connected');
    await client.channels.get('browser-ws').subscribe((m) => window.wsGot.push(m.data));
  }, { port: tern.port, key: KEY });
  const node = nodeClient().channels.get('browser-ws');
  const fromBrowser = [];
  await node.subscribe((m) => fromBrowser.push(m.data));
  await node.publish('n', 'from node');
  await page.waitForFunction(() => window.wsGot.includes('from node'), null, { timeout: 10000 });
  await page.evaluate(() => window.wsClient.channels.get('browser-ws').publish('n', 'from browser'));
  const deadline = Date.now() + 10000;
  while (!fromBrowser.includes('from browser') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  assert.ok(fromBrowser.includes('from browser'));
  await page.evaluate(() => window.wsClient.close());
});
