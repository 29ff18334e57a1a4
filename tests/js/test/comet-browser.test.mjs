// A real browser on the comet transport: headless Chromium (Debian's `chromium`, or
// $CHROMIUM) loads ably-js's browser bundle from a page served here, connects to tern
// with `transports: ['xhr_polling']` (XMLHttpRequest long-polls, cross-origin, so CORS
// and the preflighted POST /send are real), and exchanges messages with an ably-js
// WebSocket client in Node. Driven over the DevTools protocol with the `ws` package.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import { ROOT_KEY, connected, repo, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const bundle = join(repo, 'tests', 'js', 'node_modules', 'ably', 'build', 'ably.js');
const cleanups = [];
after(async () => {
  for (const cleanup of cleanups.reverse()) await cleanup();
});

/// The page: ably-js on xhr_polling only, its state and what it received on `window.result`.
function page(ternPort) {
  const options = {
    key: ROOT_KEY,
    endpoint: '127.0.0.1',
    port: ternPort,
    tls: false,
    transports: ['xhr_polling'],
    disableConnectivityCheck: true,
    fallbackHosts: [],
    useBinaryProtocol: false,
    clientId: 'browser',
  };
  return `<!doctype html><meta charset="utf-8"><title>tern comet</title>
<script src="/ably.js"></script>
<script>
  window.result = { states: [], received: [], attached: false, error: null };
  try {
    const client = new Ably.Realtime(${JSON.stringify(options)});
    client.connection.on((change) => {
      window.result.states.push(change.current);
      window.result.transport = client.connection.connectionManager.activeProtocol?.getTransport()?.shortName;
    });
    const channel = client.channels.get('browser-comet');
    channel.subscribe((m) => window.result.received.push(m.data)).then(
      () => channel.publish('hello', 'from-browser').then(() => { window.result.attached = true; }),
      (err) => { window.result.error = String(err); },
    );
  } catch (err) {
    window.result.error = String(err);
  }
</script>`;
}

/// Serves the page and the bundle on loopback; resolves with its port.
function servePage(ternPort) {
  const html = page(ternPort);
  const js = readFileSync(bundle);
  const server = createServer((req, res) => {
    if (req.url === '/ably.js') {
      res.writeHead(200, { 'content-type': 'application/javascript' }).end(js);
    } else {
      res.writeHead(200, { 'content-type': 'text/html' }).end(html);
    }
  });
  cleanups.push(() => new Promise((r) => server.close(r)));
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r(server.address().port)));
}

/// Starts headless Chromium; resolves with its DevTools port. Stopped by its PID after the tests.
async function startChromium() {
  assert.ok(existsSync(chromiumPath), `no Chromium at ${chromiumPath} (apt-get install chromium, or set CHROMIUM)`);
  const profile = mkdtempSync(join(tmpdir(), 'tern-chromium-'));
  const child = spawn(chromiumPath, [
    '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--no-default-browser-check',
    '--remote-debugging-address=127.0.0.1', '--remote-debugging-port=0', `--user-data-dir=${profile}`, 'about:blank',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  cleanups.push(async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
    await exited;
    clearTimeout(timer);
  });
  return new Promise((resolve, reject) => {
    let err = '';
    const timer = setTimeout(() => reject(new Error(`Chromium did not start in 20 s: ${err}`)), 20000);
    child.stderr.on('data', (d) => {
      err += d;
      const m = err.match(/DevTools listening on ws:\/\/127\.0\.0\.1:(\d+)\//);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`Chromium exited ${code}: ${err}`)); });
  });
}

/// A DevTools session on the browser's first page: `send(method, params)` → result.
async function devtools(port) {
  const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
  const target = targets.find((t) => t.type === 'page');
  const socket = new WebSocket(target.webSocketDebuggerUrl);
  await new Promise((r, j) => { socket.once('open', r); socket.once('error', j); });
  cleanups.push(() => socket.close());
  let next = 0;
  const waiting = new Map();
  socket.on('message', (raw) => {
    const msg = JSON.parse(raw);
    const w = waiting.get(msg.id);
    if (!w) return;
    waiting.delete(msg.id);
    if (msg.error) w.reject(new Error(JSON.stringify(msg.error)));
    else w.resolve(msg.result);
  });
  return (method, params = {}) => new Promise((resolve, reject) => {
    const id = ++next;
    waiting.set(id, { resolve, reject });
    socket.send(JSON.stringify({ id, method, params }));
  });
}

test('headless Chromium on xhr_polling gets messages from a WebSocket publisher and publishes back', async () => {
  /// Proves the comet transport in a real browser: XHR long-polls, CORS, both directions.
  const [pagePort, chromePort] = await Promise.all([servePage(suite.port), startChromium()]);
  const send = await devtools(chromePort);
  const node = await connected(suite.realtime({ transports: ['web_socket'], clientId: 'node' }));
  const fromBrowser = [];
  await node.channels.get('browser-comet').subscribe((m) => fromBrowser.push(m));
  await send('Page.navigate', { url: `http://127.0.0.1:${pagePort}/` });
  const result = async () => {
    const r = await send('Runtime.evaluate', { expression: 'JSON.stringify(window.result || null)', returnByValue: true });
    return JSON.parse(r.result.value ?? 'null');
  };
  await waitUntil(async () => {
    const r = await result();
    if (r?.error) throw new Error(`page: ${r.error}`);
    return r?.attached;
  }, 20000, 'the page to connect, attach and publish');
  const state = await result();
  assert.equal(state.transport, 'xhr_polling');
  assert.deepEqual(state.states, ['connecting', 'connected']);
  await waitUntil(() => fromBrowser.length === 1, 10000, 'the browser message over WebSocket');
  assert.equal(fromBrowser[0].data, 'from-browser');
  assert.equal(fromBrowser[0].clientId, 'browser');
  const sent = [];
  for (let i = 0; i < 20; i++) {
    sent.push(`to-browser-${i}`);
    await node.channels.get('browser-comet').publish('n', `to-browser-${i}`);
  }
  await waitUntil(async () => (await result()).received.length >= 21, 15000, '20 messages in the browser');
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual((await result()).received, ['from-browser', ...sent]);
});
