// Runs ably-js's mocha suite against Tern and gates the result on known-failures.txt.
//
//   node run.mjs --suite DIR [FILE…] [--jobs N] [--timeout-cap MS] [--transports LIST] [--no-gate]
//   node run.mjs --update-known
//
// FILE is a path under test/ (e.g. realtime/presence.test.js); none = every file of
// test/{unit,rest,realtime} except EXCLUDED. Each file runs in its own mocha process
// with its own sandbox (provisioner.mjs: one `tern serve` per app), `--jobs` at a time,
// longest first (durations of the last run). Results go to target/ably-js-suite-results/
// (one log and one JSONL per file, summary.json). The gate fails on a failure not in
// known-failures.txt and on an entry of a file that ran whose test did not fail (stale).
//
// --update-known rewrites known-failures.txt from the last run's summary: the failures of
// the files that ran, keeping the reason of every entry still failing, `TODO reason` for
// new ones; entries of files that did not run are kept as they are.
//
// Harness settings (none changes what a test asserts):
// - ABLY_TEST_TRANSPORTS (--transports LIST, or ABLY_SUITE_TRANSPORTS; default
//   web_socket,comet): the transports the suite's transport-parameterised tests run on.
//   With comet (ably-js's HTTP transport; Node's name for xhr_polling) those tests run
//   twice and realtime/transports.test.js (which needs two transports) runs; `web_socket`
//   alone is the run before Tern had comet (docs/conformance.md).
// - echo-server.mjs: a local stand-in for echo.ably.io and ably-js's connectivity check,
//   one for the run (TLS on port 443 of a loopback address of its own, behind a throwaway
//   CA that only the mocha processes trust, through NODE_EXTRA_CA_CERTS).
// - offline-dns.cjs: those hosts resolve to the stand-in; Ably's other hosts (the cloud
//   sandbox, the default endpoints) fail to resolve at once instead of depending on this
//   machine's network.
// - --timeout-cap MS (default TIMEOUT_CAP_MS; 0 = off): no test or hook waits longer than
//   this for mocha's timeout (the suite asks for 60 s, which is what failing tests wait).
import { spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startSandbox } from './provisioner.mjs';
import { startEchoServer } from './echo-server.mjs';
import { gate, parseKnown, formatKnown, updateKnown } from './known.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const resultsDir = join(repo, 'target', 'ably-js-suite-results');
const knownPath = join(here, 'known-failures.txt');

/// Files not run, and why (Sockudo's scorecard leaves out the same three).
export const EXCLUDED = {
  'realtime/liveobjects.test.js': 'LiveObjects (a separate product on its own protocol messages); out of scope',
  'rest/liveobjects.test.js': 'LiveObjects REST API; out of scope',
  'realtime/transports.test.js':
    'defines tests only when more than one transport is available (WebSocket + comet); run with --transports web_socket,comet',
};
/// The transports of a default run (see the header).
const TRANSPORTS_DEFAULT = 'web_socket,comet';
const DIRS = ['unit', 'rest', 'realtime'];
/// Default cap on mocha's per-test timeout (see docs/conformance.md for how it was chosen).
const TIMEOUT_CAP_MS = 25_000;
/// A mocha process still running after this long is killed (its finished tests count).
const FILE_WALL_MS_MAX = 30 * 60 * 1000;

function parseArgs(argv) {
  const opts = {
    files: [],
    jobs: Number(process.env.ABLY_SUITE_JOBS || 2),
    timeoutCapMs: TIMEOUT_CAP_MS,
    transports: process.env.ABLY_SUITE_TRANSPORTS || TRANSPORTS_DEFAULT,
    gate: true,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--suite') opts.suite = resolve(argv[++i]);
    else if (a === '--jobs') opts.jobs = Number(argv[++i]);
    else if (a === '--timeout-cap') opts.timeoutCapMs = Number(argv[++i]);
    else if (a === '--transports') opts.transports = argv[++i];
    else if (a === '--update-known') opts.updateKnown = true;
    else if (a === '--no-gate') opts.gate = false;
    else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
    else opts.files.push(a.replace(/^(\.\/)?test\//, ''));
  }
  if (!(opts.jobs >= 1)) throw new Error('--jobs must be >= 1');
  const known = ['web_socket', 'comet'];
  const transports = opts.transports.split(',');
  if (!transports.length || transports.some((t) => !known.includes(t))) {
    throw new Error(`--transports takes a comma list of ${known.join(', ')}`);
  }
  return opts;
}

/// Files left out of this run: transports.test.js runs when there are two transports.
function excluded(opts) {
  const out = { ...EXCLUDED };
  if (opts.transports.includes(',')) delete out['realtime/transports.test.js'];
  return out;
}

function allFiles(suite, opts) {
  const left = excluded(opts);
  return DIRS.flatMap((dir) =>
    readdirSync(join(suite, 'test', dir))
      .filter((f) => f.endsWith('.test.js'))
      .map((f) => `${dir}/${f}`),
  ).filter((f) => !(f in left));
}

function slug(file) {
  return file.replace(/[/.]/g, '_');
}

/// mocha processes running now (each its own process group), for an interrupted run.
const runningPids = new Set();
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    for (const pid of runningPids) killGroup(pid);
    // exit (not the default signal death) so the provisioner's exit hook kills every tern.
    process.exit(130);
  });
}

function killGroup(pid) {
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // The group is already empty.
  }
}

/// Runs one file in its own mocha process with its own sandbox; resolves with its results.
async function runFile(suite, file, opts, echo) {
  const base = join(resultsDir, slug(file));
  rmSync(`${base}.jsonl`, { force: true });
  rmSync(`${base}.apps`, { recursive: true, force: true });
  const sandbox = await startSandbox({ suiteDir: suite, workDir: `${base}.apps` });
  const started = Date.now();
  const args = [
    join('node_modules', 'mocha', 'bin', 'mocha'),
    '--exit',
    '--reporter',
    join(here, 'reporter.cjs'),
    '--reporter-option',
    `output=${base}.jsonl`,
    '--require',
    join(here, 'offline-dns.cjs'),
  ];
  if (opts.timeoutCapMs > 0) args.push('--require', join(here, 'timeout-cap.cjs'));
  args.push(`test/${file}`);
  const logStream = createWriteStream(`${base}.log`);
  const child = spawn(process.execPath, args, {
    cwd: suite,
    detached: true, // its own process group, so a stuck run is killed with its children
    stdio: ['ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      ABLY_LOCAL_SANDBOX_URL: sandbox.url,
      ABLY_TEST_TRANSPORTS: opts.transports,
      ABLY_SUITE_TIMEOUT_CAP_MS: String(opts.timeoutCapMs),
      ...(echo.address && { ABLY_SUITE_ECHO_ADDR: echo.address, NODE_EXTRA_CA_CERTS: echo.caFile }),
    },
  });
  runningPids.add(child.pid);
  child.stdout.pipe(logStream, { end: false });
  child.stderr.pipe(logStream, { end: false });
  const killer = setTimeout(() => {
    logStream.write(`\nrun.mjs: killed after ${FILE_WALL_MS_MAX} ms\n`);
    killGroup(child.pid);
  }, FILE_WALL_MS_MAX);
  const exit = await new Promise((done) => child.once('exit', (code, signal) => done({ code, signal })));
  clearTimeout(killer);
  runningPids.delete(child.pid);
  // Anything a test spawned that outlived mocha goes with its group.
  killGroup(child.pid);
  await sandbox.close();
  logStream.end();
  const results = readResults(`${base}.jsonl`);
  return { file, durationMs: Date.now() - started, exit, ...results };
}

/// The reporter's JSONL: one record per title (a failure overrides a pass: mocha reports
/// an error raised after a test passed as a second result for it).
function readResults(path) {
  const tests = new Map();
  let finished = false;
  const text = existsSync(path) ? readFileSync(path, 'utf8') : '';
  for (const line of text.split('\n')) {
    if (!line) continue;
    const r = JSON.parse(line);
    if (r.kind === 'end') {
      finished = true;
      continue;
    }
    const prev = tests.get(r.title);
    if (prev && prev.state === 'failed') continue;
    tests.set(r.title, { title: r.title, kind: r.kind, state: r.state, durationMs: r.durationMs, error: r.error });
  }
  return { finished, tests: [...tests.values()] };
}

/// Longest first, by the last run's durations (unknown files first: they may be long).
function schedule(files) {
  let last = {};
  try {
    last = JSON.parse(readFileSync(join(resultsDir, 'durations.json'), 'utf8'));
  } catch {
    // No earlier run.
  }
  return [...files].sort((a, b) => (last[b] ?? Infinity) - (last[a] ?? Infinity) || a.localeCompare(b));
}

async function runAll(suite, files, opts, echo) {
  const queue = schedule(files);
  const done = [];
  const worker = async () => {
    while (queue.length) {
      const file = queue.shift();
      const r = await runFile(suite, file, opts, echo);
      const counts = count(r.tests);
      const status = r.finished ? '' : `  DID NOT FINISH (exit ${r.exit.code ?? r.exit.signal})`;
      console.log(
        `  ${file.padEnd(36)} passed ${String(counts.passed).padStart(3)}  failed ${String(counts.failed).padStart(3)}` +
          `  pending ${String(counts.pending).padStart(2)}  ${(r.durationMs / 1000).toFixed(0).padStart(4)} s${status}`,
      );
      done.push(r);
    }
  };
  await Promise.all(Array.from({ length: Math.min(opts.jobs, files.length) }, worker));
  return done.sort((a, b) => a.file.localeCompare(b.file));
}

function count(tests) {
  const c = { passed: 0, failed: 0, pending: 0 };
  for (const t of tests) c[t.state]++;
  return c;
}

function writeSummary(runs, wallMs, opts) {
  const durations = {};
  try {
    Object.assign(durations, JSON.parse(readFileSync(join(resultsDir, 'durations.json'), 'utf8')));
  } catch {
    // First run.
  }
  for (const r of runs) durations[r.file] = r.durationMs;
  writeFileSync(join(resultsDir, 'durations.json'), JSON.stringify(durations, null, 1));
  const summary = {
    date: new Date().toISOString(),
    wallMs,
    jobs: opts.jobs,
    timeoutCapMs: opts.timeoutCapMs,
    transports: opts.transports,
    files: runs.map((r) => ({
      file: r.file,
      durationMs: r.durationMs,
      finished: r.finished,
      exit: r.exit,
      ...count(r.tests),
      tests: r.tests,
    })),
  };
  writeFileSync(join(resultsDir, 'summary.json'), JSON.stringify(summary, null, 1));
  return summary;
}

function printGate(result) {
  for (const e of result.flaky) console.log(`  flaky, ${e.seen}: ${e.file} :: ${e.title}`);
  if (result.unfinished.length) {
    console.log(`\nFILES THAT DID NOT FINISH (${result.unfinished.length}):`);
    for (const f of result.unfinished) console.log(`  ${f}`);
  }
  if (result.newFailures.length) {
    console.log(`\nNEW FAILURES, not in known-failures.txt (${result.newFailures.length}):`);
    for (const f of result.newFailures) console.log(`  ${f.file} :: ${f.title}\n      ${firstLine(f.error)}`);
  }
  if (result.stale.length) {
    console.log(`\nSTALE ENTRIES, listed in known-failures.txt but did not fail (${result.stale.length}):`);
    for (const e of result.stale) console.log(`  ${e.file} :: ${e.title}  (${e.seen})`);
  }
}

function firstLine(text) {
  return (text || '').split('\n')[0].slice(0, 200);
}

/// The stand-in for Ably's public hosts, or (when it cannot start, e.g. without the
/// right to bind port 443) none: the run goes on, and the tests that need it fail.
async function startEchoStandIn() {
  try {
    const echo = await startEchoServer({ dir: join(resultsDir, 'echo-stand-in') });
    console.log(`ably-js suite: echo.ably.io stand-in on https://${echo.address}:443`);
    return echo;
  } catch (err) {
    console.log(`ably-js suite: WARNING: no echo.ably.io stand-in (${err.message}); the tests that need it will fail`);
    return { address: '', caFile: '', close: async () => {} };
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (opts.updateKnown) {
    const summary = JSON.parse(readFileSync(join(resultsDir, 'summary.json'), 'utf8'));
    const known = existsSync(knownPath) ? parseKnown(readFileSync(knownPath, 'utf8')) : [];
    const { entries, added, removed } = updateKnown(known, summary);
    writeFileSync(knownPath, formatKnown(entries));
    console.log(`known-failures.txt: ${entries.length} entries (${added} added as TODO reason, ${removed} removed)`);
    return;
  }
  if (!opts.suite) throw new Error('--suite DIR is required (run.sh passes it)');
  const files = opts.files.length ? opts.files : allFiles(opts.suite, opts);
  for (const f of files) {
    if (!existsSync(join(opts.suite, 'test', f))) throw new Error(`no such test file: test/${f}`);
  }
  mkdirSync(resultsDir, { recursive: true });
  // The suite's root hook writes private-api-usage/ and may race on creating it.
  mkdirSync(join(opts.suite, 'private-api-usage'), { recursive: true });
  console.log(
    `ably-js suite: ${files.length} files, ${opts.jobs} at a time, timeout cap ${opts.timeoutCapMs || 'off'}` +
      `, transports ${opts.transports}; excluded: ${Object.keys(excluded(opts)).join(', ')}`,
  );
  const started = Date.now();
  const echo = await startEchoStandIn();
  let runs;
  try {
    runs = await runAll(opts.suite, files, opts, echo);
  } finally {
    await echo.close();
  }
  const wallMs = Date.now() - started;
  const summary = writeSummary(runs, wallMs, opts);
  const totals = count(runs.flatMap((r) => r.tests.filter((t) => t.kind === 'test')));
  console.log(
    `ably-js suite: ${runs.length} files, passed ${totals.passed}, failed ${totals.failed}, pending ${totals.pending}` +
      ` (hook failures ${runs.flatMap((r) => r.tests).filter((t) => t.kind === 'hook').length}),` +
      ` wall ${(wallMs / 1000).toFixed(0)} s; results in ${resultsDir}`,
  );
  if (!opts.gate) return;
  const known = existsSync(knownPath) ? parseKnown(readFileSync(knownPath, 'utf8')) : [];
  const result = gate(known, summary);
  printGate(result);
  if (result.newFailures.length || result.stale.length || result.unfinished.length) {
    console.log('\nably-js suite: GATE FAILED (update with: tests/ably-js-suite/run.sh --update-known, then give reasons)');
    process.exitCode = 1;
  } else {
    console.log(`ably-js suite: gate holds (${result.knownFailing} known failures, none new, none stale)`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
