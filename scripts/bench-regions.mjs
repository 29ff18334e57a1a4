// Cross-region benchmarks (issue 4), against a release build:
//  1. latency: `tern dev` (three regions in one process, WAN delays of
//     regions/topology.toml emulated on the QUIC links). A publisher on us-east sends at a
//     fixed rate (open loop, each payload carries its scheduled send time); subscribers on
//     eu-west and ap-south record publish→deliver latency. Reported with the overhead
//     above the pair's emulated one-way delay, and the WAN bytes per message per region
//     from /metrics (tern_replication_event_bytes_total / events_sent_total per peer).
//  2. failover: three `tern serve` processes (tests/js/lib/regions.mjs); an ably-js
//     subscriber on us-east with fallbackHosts = the other regions; a publisher on
//     eu-west every 10 ms; us-east is killed with SIGKILL; time from the kill to the first
//     message published after the kill arriving at the subscriber; every message checked.
// Usage: node scripts/bench-regions.mjs [rate=200] [seconds=10] [failover_runs=5]
// Needs tests/js/node_modules (cd tests/js && npm ci) and TERN_BIN or target/release/tern.
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..');
process.env.TERN_BIN = process.env.TERN_BIN || join(repo, 'target', 'release', 'tern');
const { default: WebSocket } = await import(join(repo, 'tests/js/node_modules/ws/index.js'));
const { default: Ably } = await import(join(repo, 'tests/js/node_modules/ably/build/ably-node.js'));
const { startTern, options, connected, waitUntil } = await import(join(repo, 'tests/js/lib/tern.mjs'));
const { startRegions, REGIONS, DEV_KEY } = await import(join(repo, 'tests/js/lib/regions.mjs'));
const { sample } = await import(join(repo, 'tests/js/lib/metrics.mjs'));

const [rate = '200', seconds = '10', failoverRuns = '5'] = process.argv.slice(2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function delays() {
  const text = readFileSync(join(repo, 'regions/topology.toml'), 'utf8');
  const out = {};
  for (const block of text.split('[[links]]').slice(1)) {
    const a = /a = "([^"]+)"/.exec(block)[1];
    const b = /b = "([^"]+)"/.exec(block)[1];
    const d = Number(/delay_ms = (\d+)/.exec(block)[1]);
    out[`${a}|${b}`] = d;
    out[`${b}|${a}`] = d;
  }
  return out;
}

function open(port) {
  return new Promise((resolveWs, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/?key=${encodeURIComponent(DEV_KEY)}&format=json&heartbeats=false&v=6`);
    ws.once('open', () => resolveWs(ws));
    ws.once('error', reject);
  });
}

function frames(ws, onFrame) {
  ws.on('message', (d) => onFrame(JSON.parse(d.toString())));
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function latency() {
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  try {
    const [east, west, south] = tern.ports;
    const names = ['us-east', 'eu-west', 'ap-south'];
    const channel = `lat-${Date.now()}`;
    const results = {};
    const subs = [];
    for (const [i, port] of [[0, east], [1, west], [2, south]]) {
      const ws = await open(port);
      const lat = [];
      results[names[i]] = lat;
      let attached;
      const ready = new Promise((r) => { attached = r; });
      frames(ws, (f) => {
        if (f.action === 11) attached();
        if (f.action === 15) {
          const now = performance.now();
          for (const m of f.messages) { const l = now - Number(m.data.split(":")[0]); lat.push(l); }
        }
      });
      ws.send(JSON.stringify({ action: 10, channel }));
      await ready;
      subs.push(ws);
    }
    const pub = await open(east);
    let acks = 0;
    frames(pub, (f) => { if (f.action === 1) acks += f.count; });
    await sleep(200);
    const total = Number(rate) * Number(seconds);
    const start = performance.now() + 50;
    const pad = 'x'.repeat(80);
    for (let n = 0; n < total; n++) {
      const due = start + (n * 1000) / Number(rate);
      const wait = due - performance.now();
      if (wait > 1) await sleep(wait - 1);
      while (performance.now() < due) { /* spin the last millisecond */ }
      pub.send(JSON.stringify({ action: 15, channel, msgSerial: n, messages: [{ name: 'n', data: `${due}:${pad}` }] }));
    }
    await waitUntil(() => Object.values(results).every((l) => l.length >= total) && acks >= total, 20000, 'deliveries');
    const metrics = await (await fetch(`http://127.0.0.1:${tern.admins[0]}/metrics`)).text();
    const counter = (name, peer) => sample(metrics, name, { peer }) ?? 0;
    const d = delays();
    console.log(`\n## cross-region latency: ${total} messages at ${rate}/s, 80 B payload, publisher us-east (us-east row: a subscriber on the publisher's own node, the local baseline)`);
    console.log('| to | emulated one-way ms | p50 ms | p90 ms | p99 ms | max ms | overhead p50 / p99 ms | WAN bytes per message | frames per message |');
    console.log('|---|---|---|---|---|---|---|---|---|');
    for (const [region, lat] of Object.entries(results)) {
      const sorted = [...lat].sort((a, b) => a - b);
      const delay = d[`us-east|${region}`] || 0;
      const peer = `tern-dev-${region}`;
      const bytes = counter('tern_replication_event_bytes_total', peer);
      const sent = counter('tern_replication_events_sent_total', peer);
      const f = (x) => x.toFixed(2);
      console.log(`| ${region} | ${delay} | ${f(percentile(sorted, 50))} | ${f(percentile(sorted, 90))} | ${f(percentile(sorted, 99))} | ${f(sorted.at(-1))} | ${f(percentile(sorted, 50) - delay)} / ${f(percentile(sorted, 99) - delay)} | ${(bytes / total).toFixed(0)} | ${(sent / total).toFixed(2)} |`);
    }
    console.log(metrics.split('\n').filter((l) => /^tern_replication_(resends|buffer_drops|control_bytes)|^tern_replica_ack/.test(l)).join('\n'));
    for (const ws of [...subs, pub]) ws.close();
  } finally {
    await tern.stop();
  }
}

async function failover(runs) {
  const times = [];
  for (let run = 0; run < runs; run++) {
    const cluster = await startRegions();
    const clients = [];
    try {
      const [east, west] = REGIONS.map((r) => r.host);
      const sub = new Ably.Realtime(options(cluster.port, {
        key: DEV_KEY, endpoint: east, fallbackHosts: [REGIONS[1].host, REGIONS[2].host], disconnectedRetryTimeout: 300,
      }));
      const pub = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: west }));
      clients.push(sub, pub);
      await connected(sub);
      await connected(pub);
      const got = [];
      let killedAt = 0;
      let firstAfter = null;
      await sub.channels.get('fo').subscribe((m) => {
        got.push(m.data.n);
        if (killedAt && firstAfter === null && m.data.at >= killedAt) firstAfter = Date.now() - killedAt;
      });
      const sent = [];
      const pending = [];
      for (let n = 0; n < 200; n++) {
        sent.push(n);
        pending.push(pub.channels.get('fo').publish('n', { n, at: Date.now() }));
        if (n === 100) { killedAt = Date.now(); cluster.nodes[0].child.kill('SIGKILL'); }
        await sleep(10);
      }
      await Promise.all(pending);
      await waitUntil(() => got.length >= sent.length, 20000, 'all messages');
      await sleep(300);
      const exact = JSON.stringify(got) === JSON.stringify(sent);
      if (!exact) {
        const seen = new Map();
        for (const n of got) seen.set(n, (seen.get(n) || 0) + 1);
        const missing = sent.filter((n) => !seen.has(n));
        const dups = [...seen].filter(([, c]) => c > 1).map(([n]) => n);
        console.log(`# run ${run + 1}: missing ${JSON.stringify(missing)} duplicated ${JSON.stringify(dups)} order ${JSON.stringify(got.slice(95, 115))}`);
      }
      times.push({ ms: firstAfter, exact });
    } finally {
      for (const c of clients) c.close();
      await cluster.stop();
    }
  }
  console.log(`\n## failover: SIGKILL us-east, ably-js subscriber with fallbackHosts, publisher on eu-west every 10 ms (${runs} runs)`);
  console.log('| run | kill → first message published after the kill, delivered (ms) | all 200 messages once, in order |');
  console.log('|---|---|---|');
  times.forEach((t, i) => console.log(`| ${i + 1} | ${t.ms} | ${t.exact ? 'yes' : 'NO'} |`));
}

console.log(`# bench-regions ${new Date().toISOString()} (nproc ${(await import('node:os')).cpus().length})`);
if (process.env.ONLY !== 'failover') await latency();
if (process.env.ONLY !== 'latency') await failover(Number(failoverRuns));
process.exit(0);
