// WAN bytes per replicated message (issue 17): `tern dev` (three regions in one process,
// the WAN of regions/topology.toml emulated on the QUIC links), a publisher on us-east
// sending realistic JSON messages at a fixed rate (open loop, one connection per 500
// msg/s), a subscriber on eu-west.
// For each wire (v1: TERN_CLUSTER_WIRE=1, the format before issue 17; v2: the default),
// payload (80 B chat message, 2 KB dashboard update; words and numbers drawn at random,
// so no two messages are alike) and rate, it reports the QUIC stream bytes us-east wrote
// to eu-west per message (event records, and acks/Heads/other control frames apart),
// from us-east's /metrics (its admin port), and the publish→deliver latency above the emulated one-way delay.
// Bytes are deterministic for a given run of messages; latency depends on the machine.
// Usage: node scripts/bench-wan.mjs [seconds=3] [rates=200,2000,20000] [payloads=80B,2KB] [wires=v1,v2]
// Needs tests/js/node_modules and TERN_BIN (default target/release/tern).
import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..');
process.env.TERN_BIN = process.env.TERN_BIN || join(repo, 'target', 'release', 'tern');
const { default: WebSocket } = await import(join(repo, 'tests/js/node_modules/ws/index.js'));
const { startTern } = await import(join(repo, 'tests/js/lib/tern.mjs'));
const { DEV_KEY } = await import(join(repo, 'tests/js/lib/regions.mjs'));
const { sample } = await import(join(repo, 'tests/js/lib/metrics.mjs'));

const [seconds = '3', rates = '200,2000,20000', payloads = '80B,2KB', wires = 'v1,v2'] = process.argv.slice(2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const EU_DELAY_MS = 40;

const WORDS = ('the a to meet at station lunch deploy build ok see you ticket north west east '
  + 'room lobby order shipped delayed price update alert cpu memory disk latency user team '
  + 'project review merge release tonight tomorrow morning coffee call later thanks').split(' ');
let seed = 42;
const random = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; };
const word = () => WORDS[Math.floor(random() * WORDS.length)];

/// An ~80-byte chat message (JSON text).
function chat(sentAt) {
  let text = '';
  while (text.length < 36) text += `${word()} `;
  return JSON.stringify({ t: sentAt, user: `u${Math.floor(random() * 500)}`, text: text.trim().slice(0, 36) });
}

/// A ~2 KB dashboard update (JSON text): metrics of 40 hosts.
function dashboard(sentAt) {
  const hosts = [];
  for (let i = 0; hosts.length < 40; i++) {
    hosts.push({ h: `web-${i}`, cpu: Math.round(random() * 1000) / 10, mem: Math.round(random() * 64000), rps: Math.round(random() * 5000) });
  }
  return JSON.stringify({ t: sentAt, region: 'us-east', hosts });
}

function open(port) {
  return new Promise((resolveWs, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/?key=${encodeURIComponent(DEV_KEY)}&format=json&heartbeats=false&v=6`);
    ws.once('open', () => resolveWs(ws));
    ws.once('error', reject);
  });
}

const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];

/// us-east's /metrics; an admin port that does not answer in 10 s is a finding, not a hang.
async function scrape(port) {
  const started = performance.now();
  const response = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(10000) });
  const text = await response.text();
  const took = performance.now() - started;
  if (took > 1000) console.error(`# /metrics took ${took.toFixed(0)} ms`);
  return text;
}

/// CPU seconds (user + system) the tern process has used: `tern dev` runs all three
/// regions in it, so this is the whole cluster's cost (publish, replicate, deliver).
function cpuSeconds(pid) {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

async function run(wire, payload, rate) {
  seed = 42; // the same messages for every wire
  if (wire === 'v1') process.env.TERN_CLUSTER_WIRE = '1';
  else delete process.env.TERN_CLUSTER_WIRE;
  const tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 });
  delete process.env.TERN_CLUSTER_WIRE;
  try {
    const [east, west] = tern.ports;
    const channel = `wan-${payload}-${rate}`;
    const sub = await open(west);
    const latencies = [];
    let attached;
    const ready = new Promise((r) => { attached = r; });
    sub.on('message', (d) => {
      const f = JSON.parse(d.toString());
      if (f.action === 11) attached();
      if (f.action === 15) {
        const now = performance.now();
        for (const m of f.messages) latencies.push(now - JSON.parse(m.data).t);
      }
    });
    sub.send(JSON.stringify({ action: 10, channel }));
    await ready;
    let subClosed = false;
    sub.on('close', () => { subClosed = true; });
    // One publisher connection per 500 msg/s: a connection's inbound rate is limited
    // (limits.inbound_frames_per_second), and this measures the links, not that limit.
    const pubs = [];
    let acked = 0;
    let nacked = 0;
    let nackError = '';
    for (let i = 0; i < Math.ceil(rate / 500); i++) {
      const pub = await open(east);
      pub.on('message', (d) => {
        const f = JSON.parse(d.toString());
        if (f.action === 1) acked += f.count;
        if (f.action === 2) { nacked += f.count; nackError = nackError || `${f.error?.code} ${f.error?.message}`; }
      });
      pubs.push(pub);
    }
    await sleep(300);
    const metricsBefore = await scrape(tern.admins[0]);
    const cpuBefore = cpuSeconds(tern.child.pid);
    const total = Math.round(rate * Number(seconds));
    const make = payload === '80B' ? chat : dashboard;
    let bytes = 0;
    const start = performance.now() + 20;
    for (let n = 0; n < total; n++) {
      const due = start + (n * 1000) / rate;
      const wait = due - performance.now();
      if (wait > 2) await sleep(wait - 1);
      const data = make(performance.now());
      bytes += Buffer.byteLength(data);
      const p = n % pubs.length;
      pubs[p].send(JSON.stringify({ action: 15, channel, msgSerial: Math.floor(n / pubs.length), messages: [{ name: 'm', data }] }));
    }
    const deadline = Date.now() + 30000;
    while ((latencies.length < total || acked + nacked < total) && !subClosed && Date.now() < deadline) await sleep(50);
    const cpu = cpuSeconds(tern.child.pid) - cpuBefore;
    const metrics = await scrape(tern.admins[0]);
    const counter = (text, name) => sample(text, name, { peer: 'tern-dev-eu-west' }) ?? 0;
    const delta = (name) => counter(metrics, name) - counter(metricsBefore, name);
    // Per event replicated (the events this run sent; none else crossed meanwhile).
    const events = delta('tern_replication_events_sent_total');
    const sorted = latencies.slice().sort((a, b) => a - b);
    for (const pub of pubs) pub.close();
    sub.close();
    return {
      wire, payload, rate, total,
      delivered: latencies.length,
      acked,
      nacked,
      subClosed,
      events,
      nackError,
      payloadBytes: bytes / total,
      eventBytes: delta('tern_replication_event_bytes_total') / events,
      controlBytes: delta('tern_replication_control_bytes_total') / events,
      cpuPerMessage: (cpu * 1e6) / total,
      p50: percentile(sorted, 50) - EU_DELAY_MS,
      p99: percentile(sorted, 99) - EU_DELAY_MS,
    };
  } finally {
    await tern.stop();
  }
}

console.log(`# bench-wan ${new Date().toISOString()} (nproc ${(await import('node:os')).cpus().length}, ${process.env.TERN_BIN})`);
console.log(`\n## WAN bytes us-east → eu-west per message, ${seconds} s per row`);
console.log('| wire | payload | rate msg/s | acked / nacked / replicated / delivered on eu-west | payload B | event B/msg | control B/msg | event B above payload | latency above link p50 / p99 ms | tern CPU µs/msg (3 regions) |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
const notes = [];
for (const payload of payloads.split(',')) {
  for (const rate of rates.split(',').map(Number)) {
    for (const wire of wires.split(',')) {
      const r = await run(wire, payload, rate);
      const f = (x) => x.toFixed(1);
      if (r.nackError) notes.push(`${r.wire} ${r.payload} ${r.rate}/s: first NACK ${r.nackError}`);
      console.log(`| ${r.wire} | ${r.payload} | ${r.rate} | ${r.acked} / ${r.nacked} / ${r.events} / ${r.delivered}${r.subClosed ? ' (subscriber closed)' : ''} of ${r.total} | ${f(r.payloadBytes)} | ${f(r.eventBytes)} | ${f(r.controlBytes)} | ${f(r.eventBytes - r.payloadBytes)} | ${f(r.p50)} / ${f(r.p99)} | ${f(r.cpuPerMessage)} |`);
    }
  }
}
for (const note of notes) console.log(`- ${note}`);
