// Outbound webhooks (docs/functions.md): publish → function invocation latency,
// webhook deliveries per second of one node in batch mode while publishing, and how
// fast a backlog drains (the function answers 503 while the messages are published,
// then 200: deliveries per second from the first 2xx to the last), against a local
// function.
// Starts its own `tern serve` (memory history) and function; stops only the PID it
// started.
//
// Usage: node scripts/bench-webhooks.mjs [latency_messages=500] [rate_per_s=100]
//                                        [burst_messages=20000]
// TERN_BIN picks the binary (default target/release/tern).
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import Ably from '../tests/js/node_modules/ably/build/ably-node.js';

const here = dirname(fileURLToPath(import.meta.url));
const tern = process.env.TERN_BIN || resolve(here, '..', 'target', 'release', 'tern');
const [latencyMessages = '500', rate = '100', burstMessages = '20000'] = process.argv.slice(2);

/// The function: answers 200 at once and times each message by the send time in its data.
function startFunction() {
  const fn = { latencies: [], received: 0, firstMs: 0, lastMs: 0, down: false };
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      if (fn.down) {
        res.writeHead(503).end();
        return;
      }
      const now = performance.timeOrigin + performance.now();
      for (const item of JSON.parse(Buffer.concat(chunks)).items) {
        for (const m of item.data.messages) {
          fn.received += 1;
          if (!fn.firstMs) fn.firstMs = now;
          fn.lastMs = now;
          if (m.name === 'lat') fn.latencies.push(now - Number(m.data));
        }
      }
      res.writeHead(200).end();
    });
  });
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r({ fn, server, port: server.address().port })));
}

async function startTern(functionPort) {
  const dir = mkdtempSync(join(tmpdir(), 'tern-bench-webhooks-'));
  writeFileSync(join(dir, 'tern.toml'), `
[server]
host = "127.0.0.1"
port = 0
[history]
mode = "memory"
[[apps]]
id = "bench"
[[apps.keys]]
id = "root"
secret = "benchsecret"
[[apps.rules]]
id = "latency"
channel_filter = "^lat$"
url = "http://127.0.0.1:${functionPort}/"
batch_window_ms = 0
sign_with_key = "root"
[[apps.rules]]
id = "burst"
channel_filter = "^burst$"
url = "http://127.0.0.1:${functionPort}/"
batch_window_ms = 100
batch_items_max = 1000
outbox_items_max = 100000
sign_with_key = "root"
[[apps.rules]]
id = "backlog"
channel_filter = "^backlog$"
url = "http://127.0.0.1:${functionPort}/"
batch_window_ms = 100
batch_items_max = 1000
outbox_items_max = 100000
retry_delay_initial_ms = 50
retry_delay_max_ms = 100
sign_with_key = "root"
`);
  const child = spawn(tern, ['serve', '--config', join(dir, 'tern.toml')], { cwd: dir, stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, TERN_LOG: 'warn' } });
  const port = await new Promise((r, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) r(Number(m[1]));
    });
    child.on('exit', (code) => reject(new Error(`tern exited ${code}`)));
  });
  return { child, port };
}

const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];

const { fn, server, port: functionPort } = await startFunction();
const node = await startTern(functionPort);
try {
  const rest = new Ably.Rest({ key: 'bench.root:benchsecret', endpoint: '127.0.0.1', port: node.port, tls: false, useBinaryProtocol: false, fallbackHosts: [] });
  const lat = rest.channels.get('lat');
  const gap = 1000 / Number(rate);
  for (let i = 0; i < Number(latencyMessages); i++) {
    const started = performance.now();
    await lat.publish('lat', String(performance.timeOrigin + performance.now()));
    const left = gap - (performance.now() - started);
    if (left > 0) await new Promise((r) => setTimeout(r, left));
  }
  while (fn.latencies.length < Number(latencyMessages)) await new Promise((r) => setTimeout(r, 20));
  const sorted = [...fn.latencies].sort((a, b) => a - b);
  console.log(`publish → function: ${sorted.length} messages at ${rate}/s, p50 ${percentile(sorted, 0.5).toFixed(1)} ms, p99 ${percentile(sorted, 0.99).toFixed(1)} ms, max ${sorted.at(-1).toFixed(1)} ms`);

  fn.received = 0;
  fn.firstMs = 0;
  const burst = rest.channels.get('burst');
  const perPublish = 100;
  const publishStart = performance.now();
  for (let i = 0; i < Number(burstMessages) / perPublish; i++) {
    await burst.publish(Array.from({ length: perPublish }, (_, j) => ({ name: 'b', data: `x${i * perPublish + j}` })));
  }
  const publishSeconds = (performance.now() - publishStart) / 1000;
  while (fn.received < Number(burstMessages)) await new Promise((r) => setTimeout(r, 20));
  const seconds = (fn.lastMs - fn.firstMs) / 1000;
  console.log(`batched deliveries: ${fn.received} messages in ${seconds.toFixed(2)} s from first to last delivery = ${(fn.received / seconds).toFixed(0)}/s (published in ${publishSeconds.toFixed(2)} s)`);

  fn.received = 0;
  fn.firstMs = 0;
  fn.down = true;
  const backlog = rest.channels.get('backlog');
  for (let i = 0; i < Number(burstMessages) / perPublish; i++) {
    await backlog.publish(Array.from({ length: perPublish }, (_, j) => ({ name: 'b', data: `y${i * perPublish + j}` })));
  }
  fn.down = false;
  while (fn.received < Number(burstMessages)) await new Promise((r) => setTimeout(r, 20));
  const drain = (fn.lastMs - fn.firstMs) / 1000;
  console.log(`backlog drain: ${fn.received} messages queued while the function was down, delivered in ${drain.toFixed(2)} s = ${(fn.received / drain).toFixed(0)}/s`);
} finally {
  node.child.kill('SIGTERM');
  server.close();
}
