// Client-churn chaos (issue 10): N ably-js subscribers spread over the three regions of
// `tern dev`, publishers in every region, and TCP proxies that keep cutting random
// transports (RST, or silently: a blackhole the client only notices by its idle timeout)
// while the publishers run. ably-js resumes by itself. At the end every subscriber must
// hold every ACKed message of every publisher exactly once, in per-publisher order, and
// every drop must have been survived by a resume (same connection, channel RESUMED).
//
// Processes: this conductor; `tern dev`; one proxy per region (proxy-worker.mjs); the
// publishers (publishers.mjs); the subscribers split over a few processes
// (subscribers.mjs). Every phase is bounded in time; the conductor stops only the
// processes it started, by their PID.
//
// Usage: node churn/churn.mjs [--quick] [--clients N] [--publishers N] [--channels N]
//   [--rate MSGS_PER_S] [--drops N] [--drop-rate PER_S] [--duration S]
//   [--silent-fraction F] [--young-fraction F] [--publisher-fraction F]
//   [--handshake-fraction F] [--seed N] [--per-process N] [--settle S] [--out FILE]
// A cut is silent with probability silent-fraction, else an RST. With probability
// handshake-fraction it is armed for the next new transport (nearly always a resume)
// and made when the server's CONNECTED comes, which the client then never sees; else it
// hits the transport that connected last (likely mid-resume) with probability
// young-fraction, a publisher's with probability publisher-fraction, or a random one.
// Env: TERN_BIN (default target/release/tern).
import { spawn } from 'node:child_process';
import { createWriteStream, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { rng, sleep, spawnWorker } from './rpc.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..', '..');
const DEV_KEY = 'dev.root:dev-secret-change-me';
const REGIONS = ['us-east', 'eu-west', 'ap-south'];
/// `tern dev`'s connectionStateTtl (the edge default): a fresh connection after this
/// long down is expected, not a failure.
const CONNECTION_STATE_TTL_MS = 120000;

const FULL = {
  clients: 1000, publishers: 6, channels: 1, rate: 2, drops: 10000, 'drop-rate': 25, duration: 540,
  'silent-fraction': 0.1, 'young-fraction': 0.1, 'publisher-fraction': 0.1, 'handshake-fraction': 0.05, 'per-process': 250,
  settle: 90,
};
const QUICK = {
  clients: 50, publishers: 6, channels: 1, rate: 5, drops: 200, 'drop-rate': 20, duration: 20,
  'silent-fraction': 0.05, 'young-fraction': 0.1, 'publisher-fraction': 0.1, 'handshake-fraction': 0.1, 'per-process': 50,
  settle: 40,
};

function parse() {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      clients: { type: 'string' }, publishers: { type: 'string' }, channels: { type: 'string' },
      rate: { type: 'string' }, drops: { type: 'string' }, 'drop-rate': { type: 'string' },
      duration: { type: 'string' }, 'silent-fraction': { type: 'string' }, seed: { type: 'string' },
      'young-fraction': { type: 'string' }, 'publisher-fraction': { type: 'string' },
      'handshake-fraction': { type: 'string' },
      'per-process': { type: 'string' }, settle: { type: 'string' }, out: { type: 'string' },
    },
  });
  const base = values.quick ? QUICK : FULL;
  const config = { quick: values.quick, out: values.out };
  for (const [name, fallback] of Object.entries(base)) {
    const value = values[name] === undefined ? fallback : Number(values[name]);
    if (!Number.isFinite(value) || value < 0) throw new Error(`--${name} must be a number >= 0`);
    config[name] = value;
  }
  config.seed = values.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(values.seed);
  if (config.clients < 3 || config.publishers < 1 || config.channels < 1) {
    throw new Error('need at least 3 clients, 1 publisher and 1 channel');
  }
  return config;
}

/// `tern dev --port 0` in a scratch directory (its redb files go there); its log goes to
/// tern.log beside them. Resolves with the three client ports and admin ports.
async function startDev(dir) {
  const bin = process.env.TERN_BIN || join(repo, 'target', 'release', 'tern');
  const log = createWriteStream(join(dir, 'tern.log'));
  const child = spawn(bin, ['dev', '--port', '0'], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TERN_LOG: process.env.TERN_LOG || 'warn' },
  });
  child.stderr.pipe(log);
  const [ports, admins] = await new Promise((resolvePorts, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`tern dev did not start in 30 s (log: ${dir}/tern.log)`)), 30000);
    child.stdout.on('data', (d) => {
      out += d;
      const found = [...out.matchAll(/listening on http:\/\/127\.0\.0\.1:(\d+)/g)].map((m) => Number(m[1]));
      const admin = [...out.matchAll(/tern admin on http:\/\/127\.0\.0\.1:(\d+)/g)].map((m) => Number(m[1]));
      if (found.length >= 3) { clearTimeout(timer); resolvePorts([found, admin]); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`tern dev exited ${code} (log: ${dir}/tern.log)`)); });
  });
  child.stdout.resume();
  child.removeAllListeners('exit');
  return {
    bin,
    ports,
    /// Each region's admin port (`/regions`, `/metrics`), in region order.
    admins,
    child,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/// Waits (at most 30 s) until every region lists all three in GET /regions (on the
/// admin ports).
async function clusterFormed(ports) {
  const deadline = Date.now() + 30000;
  for (;;) {
    const counts = await Promise.all(ports.map(async (port) => {
      try {
        const body = await (await fetch(`http://127.0.0.1:${port}/regions`)).json();
        return body.regions.length;
      } catch {
        return 0;
      }
    }));
    if (counts.every((n) => n === 3)) return;
    if (Date.now() > deadline) throw new Error(`cluster did not form: regions seen ${counts}`);
    await sleep(200);
  }
}

const log = (...args) => console.log(`[churn ${new Date().toISOString().slice(11, 19)}]`, ...args);

async function main() {
  const config = parse();
  const started = Date.now();
  const random = rng(config.seed);
  const dir = mkdtempSync(join(tmpdir(), 'tern-churn-'));
  log(`seed ${config.seed}; ${config.clients} subscribers, ${config.publishers} publishers, ${config.channels} channel(s), `
    + `${config.rate} msg/s per publisher, ${config.drops} drops at ${config['drop-rate']}/s (silent ${config['silent-fraction']}), scratch ${dir}`);
  const stoppers = [];
  /// The whole run is bounded: start-up, chaos, settling and the report.
  const budgetMs = (config.duration + config.settle * 2 + 180) * 1000;
  const watchdog = setTimeout(() => {
    log(`FAILED: run exceeded its ${budgetMs / 1000} s budget`);
    Promise.allSettled(stoppers.map((stop) => stop())).then(() => process.exit(3));
  }, budgetMs);
  let stopping = false;
  const onSignal = async () => {
    if (stopping) return;
    stopping = true;
    await Promise.allSettled(stoppers.map((stop) => stop()));
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    const ok = await run(config, random, dir, stoppers, started);
    clearTimeout(watchdog);
    await Promise.allSettled(stoppers.map((stop) => stop()));
    // The stores of a passing run are of no further use; a failing run keeps them.
    if (ok) rmSync(join(dir, 'tern-data'), { recursive: true, force: true });
    return ok;
  } finally {
    clearTimeout(watchdog);
    await Promise.allSettled(stoppers.map((stop) => stop()));
  }
}

async function run(config, random, dir, stoppers, started) {
  const tern = await startDev(dir);
  stoppers.push(() => tern.stop());
  log(`tern dev (${tern.bin}) on ports ${tern.ports.join(', ')}`);
  await clusterFormed(tern.admins);

  const proxies = [];
  for (const port of tern.ports) {
    const proxy = spawnWorker(join(here, 'proxy-worker.mjs'), [String(port), String(Math.floor(random() * 2 ** 31))]);
    stoppers.push(() => proxy.stop());
    proxy.port = await proxy.call('port');
    proxies.push(proxy);
  }
  const ably = {
    key: DEV_KEY,
    disconnectedRetryTimeout: 1000,
    suspendedRetryTimeout: 1000,
  };
  const shared = { ably, channels: config.channels, publishers: config.publishers, connectionStateTtlMs: CONNECTION_STATE_TTL_MS };

  // Subscribers first, all attached before the first publish: each must get everything.
  const plan = Array.from({ length: config.clients }, (_, i) => ({
    label: `s${i}`, port: proxies[i % 3].port, channel: `churn-${i % config.channels}`, binary: i % 2 === 1,
  }));
  const groups = [];
  for (let i = 0; i < plan.length; i += config['per-process']) groups.push(plan.slice(i, i + config['per-process']));
  const subscriberWorkers = groups.map(() => {
    const worker = spawnWorker(join(here, 'subscribers.mjs'));
    stoppers.push(() => worker.stop());
    return worker;
  });
  const connectStarted = Date.now();
  const attachTimeoutMs = 60000 + config.clients * 100;
  await Promise.all(subscriberWorkers.map((worker, g) => worker.call('start', {
    subscribers: groups[g],
    settings: { ...shared, rampConcurrency: 10, attachTimeoutMs },
  }, attachTimeoutMs + 10000)));
  log(`${config.clients} subscribers attached in ${subscriberWorkers.length} processes (${Date.now() - connectStarted} ms)`);

  const publishers = spawnWorker(join(here, 'publishers.mjs'));
  stoppers.push(() => publishers.stop());
  await publishers.call('start', {
    publishers: Array.from({ length: config.publishers }, (_, k) => ({
      index: k, label: `p${k}`, port: proxies[k % 3].port, binary: k % 2 === 1,
    })),
    settings: { ...shared, ratePerSec: config.rate, inFlightMax: 200 },
  }, 40000);
  await publishers.call('run');
  log(`${config.publishers} publishers running`);

  const cuts = await chaos(config, random, proxies, publishers, subscriberWorkers);

  // Let the last cut transports resume while publishing goes on, then stop publishing.
  await sleep(3000);
  const publisherSettleMs = config.settle * 1000;
  const published = await publishers.call('stop', { settleMs: publisherSettleMs }, publisherSettleMs + 10000);
  const expected = published.map((p) => ({ published: p.published, unacked: p.unacked }));
  log(`publishing stopped: ${sum(published, 'published')} published, ${sum(published, 'acked')} ACKed`);
  const settleMs = config.settle * 1000;
  const tallies = await Promise.all(subscriberWorkers.map((worker) => worker.call('verify', {
    expected, settleMs, quietMs: 1500,
  }, settleMs + 20000)));
  const proxyStats = await Promise.all(proxies.map((proxy) => proxy.call('stats')));
  const cpu = await cpuSeconds(tern, proxies, publishers, subscriberWorkers);
  await Promise.allSettled([publishers, ...subscriberWorkers].map((w) => w.call('close', {}, 10000)));

  return report(config, { started, cuts, published, tallies, proxyStats, cpu, dir });
}

/// CPU seconds (user + system) each part of the run used so far: tern from
/// /proc/PID/stat, the Node processes from process.cpuUsage().
async function cpuSeconds(tern, proxies, publishers, subscriberWorkers) {
  const node = async (workers) => {
    const usages = await Promise.all(workers.map((w) => w.call('cpu')));
    return usages.reduce((total, u) => total + (u.user + u.system) / 1e6, 0);
  };
  let ternSeconds = null;
  try {
    // Fields after the command name; utime and stime are the 14th and 15th of the line.
    const stat = readFileSync(`/proc/${tern.child.pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    ternSeconds = (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    // Not Linux: leave it out.
  }
  const round = (x) => (x === null ? null : Math.round(x * 10) / 10);
  return {
    tern: round(ternSeconds),
    proxies: round(await node(proxies)),
    publishers: round(await node([publishers])),
    subscribers: round(await node(subscriberWorkers)),
  };
}

/// Cuts transports at `drop-rate` per second until `drops` were cut or `duration` is up.
async function chaos(config, random, proxies, publishers, subscriberWorkers) {
  const TICK_MS = 100;
  const began = Date.now();
  /// Cuts made at once, and cuts armed for a new transport's CONNECTED (made later,
  /// when one comes; counted from the proxies' stats at the end).
  const done = { rst: 0, silent: 0, armed: 0 };
  const made = () => done.rst + done.silent + done.armed;
  let lastLog = began;
  const holdMs = [5000, 40000];
  while (made() < config.drops && Date.now() - began < config.duration * 1000) {
    const elapsed = (Date.now() - began) / 1000;
    const target = Math.min(config.drops, Math.floor(elapsed * config['drop-rate']));
    // Catch up after a slow tick, but never in one burst of more than a second's worth.
    const due = Math.min(target - made(), Math.ceil(config['drop-rate']));
    if (due > 0) {
      const cuts = proxies.map(() => []);
      const arms = proxies.map(() => []);
      for (let i = 0; i < due; i++) {
        const kind = random() < config['silent-fraction'] ? 'silent' : 'rst';
        const region = Math.floor(random() * proxies.length);
        const pick = random();
        let bound = config['handshake-fraction'];
        if (pick < bound) { arms[region].push(kind); continue; }
        const target = pick < (bound += config['young-fraction']) ? 'young'
          : pick < bound + config['publisher-fraction'] ? 'publisher' : 'any';
        cuts[region].push({ kind, target });
      }
      const answers = await Promise.all(proxies.map(async (proxy, r) => {
        if (arms[r].length) done.armed += await proxy.call('arm', { kinds: arms[r], holdMs });
        return cuts[r].length ? proxy.call('cut', { cuts: cuts[r], minAgeMs: 500, holdMs }) : [];
      }));
      for (const kind of answers.flat()) done[kind] += 1;
    }
    if (Date.now() - lastLog >= 10000) {
      lastLog = Date.now();
      const [pub, subs] = await Promise.all([
        publishers.call('progress'),
        Promise.all(subscriberWorkers.map((w) => w.call('progress'))),
      ]);
      log(`${Math.round(elapsed)} s: ${done.rst} RST + ${done.silent} silent cuts + ${done.armed} armed; ${pub.issued} published, `
        + `${pub.acked} ACKed, ${pub.inFlight} in flight; ${sum(subs, 'deliveries')} deliveries; `
        + `${sum(subs, 'connected')}/${sum(subs, 'total')} subscribers connected`);
    }
    await sleep(TICK_MS);
  }
  const unfired = (await Promise.all(proxies.map((proxy) => proxy.call('disarm')))).reduce((a, b) => a + b, 0);
  const ms = Date.now() - began;
  log(`chaos over in ${(ms / 1000).toFixed(1)} s: ${done.rst} RST + ${done.silent} silent cuts, `
    + `${done.armed - unfired} of ${done.armed} armed cuts made`);
  return { ms, unfired };
}

function sum(items, field) { return items.reduce((total, item) => total + item[field], 0); }

function report(config, { started, cuts, published, tallies, proxyStats, cpu, dir }) {
  const subs = {};
  for (const field of ['subscribers', 'deliveries', 'lost', 'duplicated', 'outOfOrder', 'unexpected', 'unsettled',
    'disconnects', 'resumed', 'fresh', 'freshAfterTtl', 'suspended', 'failed', 'discontinuities', 'channelSuspended',
    'sameConnection']) {
    subs[field] = sum(tallies, field);
  }
  const pubs = {
    published: sum(published, 'published'),
    acked: sum(published, 'acked'),
    unacked: published.reduce((n, p) => n + p.unacked.length, 0),
    unanswered: sum(published, 'unanswered'),
    disconnects: sum(published, 'disconnects'),
    resumed: sum(published, 'resumed'),
    fresh: sum(published, 'fresh'),
    rejectedCodes: {},
  };
  for (const p of published) {
    for (const [code, n] of Object.entries(p.rejectedCodes)) pubs.rejectedCodes[code] = (pubs.rejectedCodes[code] || 0) + n;
  }
  const cutsBy = {
    rst: sum(proxyStats, 'rst'),
    silent: sum(proxyStats, 'silent'),
    atConnected: sum(proxyStats, 'handshake'),
    ofSubscribers: sum(proxyStats, 'subscriber'),
    ofPublishers: sum(proxyStats, 'publisher'),
    young: sum(proxyStats, 'young'),
    noneEligible: sum(proxyStats, 'none_eligible'),
  };
  // Each subscriber receives the ACKed messages of the channel it is on.
  const expectedDeliveries = Math.round(pubs.acked * (config.clients / config.channels));
  const failures = [];
  const check = (ok, what) => { if (!ok) failures.push(what); };
  check(pubs.acked > 0, 'no publish was ACKed');
  check(subs.lost === 0, `${subs.lost} ACKed messages lost`);
  check(subs.duplicated === 0, `${subs.duplicated} messages duplicated`);
  check(subs.outOfOrder === 0, `${subs.outOfOrder} messages out of per-publisher order`);
  check(subs.unexpected === 0, `${subs.unexpected} unexpected messages`);
  check(subs.unsettled === 0, `${subs.unsettled} subscribers not connected and attached at the end`);
  check(subs.fresh + pubs.fresh === 0, `${subs.fresh + pubs.fresh} fresh connections (resume failed) before connectionStateTtl`);
  check(subs.discontinuities === 0, `${subs.discontinuities} channel re-attaches without RESUMED`);
  check(subs.failed === 0, `${subs.failed} connections FAILED`);
  check(subs.sameConnection === subs.subscribers, `${subs.subscribers - subs.sameConnection} subscribers ended on another connection than their first`);
  check(pubs.unanswered === 0, `${pubs.unanswered} publishes never answered`);
  const drops = cutsBy.rst + cutsBy.silent;
  check(drops + cuts.unfired >= config.drops, `only ${drops} of ${config.drops} drops made`);
  const result = {
    date: new Date().toISOString(),
    seed: config.seed,
    config,
    wallMs: Date.now() - started,
    chaosMs: cuts.ms,
    cuts: cutsBy,
    subscribers: subs,
    publishers: pubs,
    expectedDeliveries,
    proxies: proxyStats,
    cpuSeconds: cpu,
    examples: tallies.flatMap((t) => t.examples).slice(0, 40),
    lostExamples: tallies.flatMap((t) => t.lostExamples).slice(0, 10),
    scratch: dir,
    failures,
  };
  const out = config.out || join(dir, 'churn.json');
  writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
  const survived = subs.resumed + pubs.resumed;
  console.log(`
== churn result (seed ${config.seed}; ${(result.wallMs / 1000).toFixed(0)} s wall, ${(cuts.ms / 1000).toFixed(0)} s of chaos)
transport drops:   ${drops} (${cutsBy.rst} RST, ${cutsBy.silent} silent; ${cutsBy.ofSubscribers} subscriber, ${cutsBy.ofPublishers} publisher; ${cutsBy.atConnected} at the server's CONNECTED, ${cutsBy.young} other < 500 ms after (re)connecting)
seen by clients:   ${subs.disconnects + pubs.disconnects} disconnects; ${survived} resumed (same connection), ${subs.fresh + pubs.fresh} fresh before TTL, ${subs.freshAfterTtl} fresh after TTL
                   ${subs.sameConnection} of ${subs.subscribers} subscribers end on the connection they started on
channels:          ${subs.discontinuities} re-attached without RESUMED, ${subs.channelSuspended} suspended
messages:          ${pubs.published} published, ${pubs.acked} ACKed, ${pubs.unacked} not ACKed ${JSON.stringify(pubs.rejectedCodes)}
deliveries:        ${subs.deliveries} (ACKed messages x subscribers on their channel: ${expectedDeliveries})
lost:              ${subs.lost}
duplicated:        ${subs.duplicated}
out of order:      ${subs.outOfOrder}
CPU seconds:       tern ${cpu.tern}, proxies ${cpu.proxies}, publishers ${cpu.publishers}, subscribers ${cpu.subscribers}
report:            ${out}`);
  if (failures.length) {
    console.log(`FAILED:\n  ${failures.join('\n  ')}`);
    for (const e of result.examples) console.log('  example', JSON.stringify(e));
    for (const e of result.lostExamples) console.log('  lost', JSON.stringify(e));
    console.log(`  tern log: ${dir}/tern.log`);
  } else {
    console.log('OK: every ACKed message reached every subscriber once, in order; every drop was resumed');
  }
  return failures.length === 0;
}

main().then((ok) => process.exit(ok ? 0 : 1), (err) => {
  console.error(`[churn] error: ${err?.stack || err}`);
  process.exit(2);
});
