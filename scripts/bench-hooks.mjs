// Before-publish functions (docs/functions.md): what a local function adds to publish
// latency. ably-js publishes one message at a time (each awaited: the ACK round trip)
// on a channel with no function, then on one whose function accepts at once; reports
// p50/p99 of both. Starts its own `tern serve` (memory history) and function; stops only
// the PID it started.
//
// Usage: node scripts/bench-hooks.mjs [messages=1000]
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
const messages = Number(process.argv[2] || 1000);

/// The function: accepts every publish at once (it still parses the body, as a real one
/// would).
function startFunction() {
  let calls = 0;
  const server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      JSON.parse(Buffer.concat(chunks));
      calls += 1;
      res.writeHead(200, { 'content-type': 'application/json' }).end('{"action":"accept"}');
    });
  });
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r({ server, port: server.address().port, calls: () => calls })));
}

async function startTern(functionPort) {
  const dir = mkdtempSync(join(tmpdir(), 'tern-bench-hooks-'));
  writeFileSync(join(dir, 'tern.toml'), `
[server]
host = "127.0.0.1"
port = 0
[limits]
inbound_frames_per_second = 100000   # one-at-a-time publishes go faster than the default
[history]
mode = "memory"
[[apps]]
id = "bench"
[[apps.keys]]
id = "root"
secret = "benchsecret"
[[apps.before_publish]]
id = "accept"
channel_filter = "^hooked$"
url = "http://127.0.0.1:${functionPort}/"
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

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function measure(channel, count) {
  const latencies = [];
  for (let i = 0; i < 50; i++) await channel.publish('warm', 'x'); // warm-up, not counted
  for (let i = 0; i < count; i++) {
    const start = performance.now();
    await channel.publish('m', `message ${i}`);
    latencies.push(performance.now() - start);
  }
  latencies.sort((a, b) => a - b);
  return { p50: percentile(latencies, 50), p99: percentile(latencies, 99) };
}

const fn = await startFunction();
const node = await startTern(fn.port);
const client = new Ably.Realtime({
  key: 'bench.root:benchsecret', endpoint: '127.0.0.1', port: node.port, tls: false,
  useBinaryProtocol: false, disableConnectivityCheck: true, fallbackHosts: [], logLevel: 0,
});
try {
  await new Promise((r) => client.connection.once('connected', r));
  const plain = await measure(client.channels.get('plain'), messages);
  const hooked = await measure(client.channels.get('hooked'), messages);
  const ms = (v) => `${v.toFixed(2)} ms`;
  console.log(`publish → ACK, ${messages} messages, one at a time (${tern})`);
  console.log(`  no function:         p50 ${ms(plain.p50)}  p99 ${ms(plain.p99)}`);
  console.log(`  before-publish (local function): p50 ${ms(hooked.p50)}  p99 ${ms(hooked.p99)}`);
  console.log(`  function calls: ${fn.calls()}`);
} finally {
  client.close();
  node.child.kill('SIGTERM');
  fn.server.close();
}
