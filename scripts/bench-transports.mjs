// Per-transport fan-out on the same load (issue 13): one release `tern serve`, one
// channel, N subscribers over one transport at a time (WebSocket, comet long-poll, SSE,
// MQTT), one ably-js publisher over WebSocket sending R msg/s open loop for S seconds;
// each payload carries its scheduled send time, so every delivery's latency is measured
// in this process (one clock). Reported per transport: deliveries/s, p50/p99/max
// latency, lost/duplicated deliveries, and the server's CPU per delivery (from
// /proc/PID/stat over the window). Transports run one after another, twice, interleaved.
//
// Usage: node scripts/bench-transports.mjs [subscribers=50] [rate=200] [seconds=10] [transports=ws,comet,sse,mqtt]
// Needs tests/js/node_modules (cd tests/js && npm ci; `mqtt` for the MQTT subscribers) and
// TERN_BIN or target/release/tern (cargo build --release -p tern-server).
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..');
process.env.TERN_BIN = process.env.TERN_BIN || join(repo, 'target', 'release', 'tern');
const modules = join(repo, 'tests/js/node_modules');
const { default: Ably } = await import(join(modules, 'ably/build/ably-node.js'));
const { startTern, testConfig, options, ROOT_KEY } = await import(join(repo, 'tests/js/lib/tern.mjs'));
const { sseBlocks } = await import(join(repo, 'tests/js/lib/sse.mjs'));

const [subscribers = '50', rate = '200', seconds = '10', which = 'ws,comet,sse,mqtt'] = process.argv.slice(2);
const N = Number(subscribers);
const R = Number(rate);
const S = Number(seconds);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const mqttPort = Number(process.env.BENCH_MQTT_PORT || 0) || await freePort();
const config = testConfig({ limits: 'connections_max = 19000' }) +
  (which.includes('mqtt') ? `\n[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = ${mqttPort}\n` : '');

async function freePort() {
  const { createServer } = await import('node:net');
  return new Promise((ok) => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

/// CPU seconds (user + system) the process has used so far.
function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // clock ticks (USER_HZ = 100)
}

/// Subscribers of one transport; each calls `got(data)` per message.
const transports = {
  async ws(port, channel, got) {
    const clients = [];
    for (let i = 0; i < N; i++) {
      const c = new Ably.Realtime(options(port, { transports: ['web_socket'] }));
      clients.push(c);
      await c.channels.get(channel).subscribe((m) => got(m.data));
    }
    return () => clients.forEach((c) => c.close());
  },
  async comet(port, channel, got) {
    const clients = [];
    for (let i = 0; i < N; i++) {
      const c = new Ably.Realtime(options(port, { transports: ['comet'] })); // Node's name for the comet transport (xhr_polling in browsers)
      clients.push(c);
      await c.channels.get(channel).subscribe((m) => got(m.data));
    }
    return () => clients.forEach((c) => c.close());
  },
  async sse(port, channel, got) {
    const controllers = [];
    for (let i = 0; i < N; i++) {
      const controller = new AbortController();
      controllers.push(controller);
      const url = `http://127.0.0.1:${port}/sse?v=1.2&enveloped=false&channels=${channel}&key=${encodeURIComponent(ROOT_KEY)}`;
      const response = await fetch(url, { signal: controller.signal });
      (async () => {
        try {
          for await (const { event, data } of sseBlocks(response.body)) {
            if (event === 'message') got(data);
          }
        } catch { /* aborted */ }
      })();
    }
    return () => controllers.forEach((c) => c.abort());
  },
  async mqtt(port, channel, got) {
    const { default: mqtt } = await import(join(modules, 'mqtt/build/index.js')).catch(() => import('mqtt'));
    const [username, password] = ROOT_KEY.split(':');
    const clients = [];
    for (let i = 0; i < N; i++) {
      const c = mqtt.connect(`mqtt://127.0.0.1:${mqttPort}`, { username, password, protocolVersion: 4, clean: true });
      clients.push(c);
      await new Promise((ok, fail) => { c.once('connect', ok); c.once('error', fail); });
      await c.subscribeAsync(channel, { qos: 0 });
      c.on('message', (_topic, payload) => got(payload.toString()));
    }
    return () => clients.forEach((c) => c.end(true));
  },
};

async function run(tern, name, round) {
  const channel = `bench-${name}-${round}`;
  const latencies = [];
  const seen = new Map();
  let duplicates = 0;
  const got = (data) => {
    const now = performance.now() + performance.timeOrigin;
    const { t, i } = JSON.parse(data);
    latencies.push(now - t);
    const count = (seen.get(i) || 0) + 1;
    seen.set(i, count);
    if (count > N) duplicates++;
  };
  const close = await transports[name](tern.port, channel, got);
  await sleep(500);
  const publisher = new Ably.Realtime(options(tern.port, { transports: ['web_socket'] }));
  const pub = publisher.channels.get(channel);
  await pub.attach();
  const total = R * S;
  const start = performance.now() + performance.timeOrigin + 100;
  const cpu0 = cpuSeconds(tern.child.pid);
  for (let i = 0; i < total; i++) {
    const due = start + (i * 1000) / R;
    const wait = due - (performance.now() + performance.timeOrigin);
    if (wait > 1) await sleep(wait);
    pub.publish('n', JSON.stringify({ t: due, i }));
  }
  const deadline = Date.now() + 10_000;
  while (latencies.length < total * N && Date.now() < deadline) await sleep(50);
  const cpu = cpuSeconds(tern.child.pid) - cpu0;
  const elapsed = (performance.now() + performance.timeOrigin - start) / 1000;
  publisher.close();
  close();
  latencies.sort((a, b) => a - b);
  const q = (p) => latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] ?? NaN;
  const delivered = latencies.length;
  return {
    name, round, delivered, expected: total * N, lost: total * N - delivered + duplicates, duplicates,
    perSecond: delivered / S, p50: q(0.5), p99: q(0.99), max: latencies.at(-1) ?? NaN,
    cpuUsPerDelivery: (cpu * 1e6) / Math.max(1, delivered), elapsed,
  };
}

const tern = await startTern(config);
const rows = [];
try {
  for (const round of [1, 2]) {
    for (const name of which.split(',')) {
      const r = await run(tern, name, round);
      rows.push(r);
      console.error(`${name} round ${round}: ${r.delivered}/${r.expected} delivered, p99 ${r.p99.toFixed(1)} ms`);
      await sleep(1000);
    }
  }
} finally {
  await tern.stop();
}
console.log(`\n${N} subscribers × ${R} msg/s for ${S} s (${N * R} deliveries/s offered), one channel, publisher on WebSocket\n`);
console.log('| transport | round | deliveries/s | p50 ms | p99 ms | max ms | lost | dup | server CPU µs/delivery |');
console.log('|---|---|---|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.name} | ${r.round} | ${Math.round(r.perSecond)} | ${r.p50.toFixed(2)} | ${r.p99.toFixed(2)} | ${r.max.toFixed(1)} | ${r.lost} | ${r.duplicates} | ${r.cpuUsPerDelivery.toFixed(2)} |`);
}
