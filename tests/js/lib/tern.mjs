// Spawns a tern binary for a test file and gives SDK options pointing at it.
import { spawn } from 'node:child_process';
import { after, before } from 'node:test';
import Ably from 'ably';
import { appendFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, '..', '..', '..');
export const ternBin = process.env.TERN_BIN || join(repo, 'target', 'debug', 'tern');

export const ROOT_KEY = 'test.root:rootsecret';
export const LIMITED_KEY = 'test.limited:limitedsecret';

/// The test config: `extra` is appended TOML (sections not already present).
export function testConfig({ limits = '', connection = '', history = '' } = {}) {
  return `
[server]
host = "127.0.0.1"
port = 0

[limits]
sync_page_size = 10
${limits}

[connection]
${connection}

[history]
${history || 'mode = "memory"'}

[[apps]]
id = "test"

[[apps.keys]]
id = "root"
secret = "rootsecret"
capability = '{"*":["*"]}'

[[apps.keys]]
id = "limited"
secret = "limitedsecret"
capability = '{"allowed:*":["publish","subscribe","presence","history"],"readonly:*":["subscribe"]}'
`;
}

/// With `TERN_TEST_LOGS` set (tests/run.sh sets it), every tern a test file starts has
/// its log appended to `<dir>/<test file>.log`, each line tagged with the PID, so a
/// failure in CI comes with what the servers said (run.sh prints it).
function keepLog(pid, chunk) {
  const dir = process.env.TERN_TEST_LOGS;
  if (!dir) return;
  const lines = String(chunk).split('\n').filter((l) => l.length).map((l) => `[${pid}] ${l}\n`).join('');
  appendFileSync(join(dir, `${basename(process.argv[1] || 'tern')}.log`), lines);
}

/// Starts tern with `config` (TOML text); resolves once it prints its listening line.
/// With `args`, runs those arguments instead of `serve --config …` (e.g. `dev`), and
/// waits for `listening` such lines; `ports` lists them all (`admins`: their admin ports).
export async function startTern(config = testConfig(), { dir, args, listening = 1 } = {}) {
  dir = dir || mkdtempSync(join(tmpdir(), 'tern-test-'));
  const path = join(dir, 'tern.toml');
  writeFileSync(path, config);
  const child = spawn(ternBin, args || ['serve', '--config', path, '--port', '0'], {
    cwd: dir,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TERN_LOG: process.env.TERN_LOG || 'warn' },
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; keepLog(child.pid, d); });
  let admins = [];
  const ports = await new Promise((resolvePorts, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`tern did not start in 20s: ${stderr}`)), 20000);
    child.stdout.on('data', (d) => {
      out += d;
      const found = [...out.matchAll(/listening on https?:\/\/127\.\d+\.\d+\.\d+:(\d+)/g)].map((m) => Number(m[1]));
      // Each node prints its admin line (`/metrics`, `/regions`) before its listening line.
      admins = [...out.matchAll(/tern admin on http:\/\/127\.\d+\.\d+\.\d+:(\d+)/g)].map((m) => Number(m[1]));
      if (found.length >= listening) { clearTimeout(timer); resolvePorts(found); }
    });
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`tern exited ${code}: ${stderr}`)); });
  });
  child.removeAllListeners('exit');
  return {
    port: ports[0],
    ports,
    /// Admin ports (`/metrics`, `/regions`, the status page), in the same order.
    admin: admins[0],
    admins,
    dir,
    child,
    /// What the process has written to stderr so far (its log, `TERN_LOG=warn` unless set).
    get stderr() { return stderr; },
    /// SIGTERM, then SIGKILL after 3 s; only this child's PID.
    async stop(signal = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(timer);
    },
  };
}

/// ably-js options for a server on `port`. JSON unless `binary: true`.
export function options(port, extra = {}) {
  const { binary, ...rest } = extra;
  const opts = {
    key: ROOT_KEY,
    endpoint: '127.0.0.1',
    port,
    tls: false,
    disableConnectivityCheck: true,
    fallbackHosts: [],
    logLevel: 0,
    ...rest,
  };
  if (!binary) opts.useBinaryProtocol = false;
  return opts;
}

/// Resolves when `predicate()` is true (polled), rejects after `ms`.
export async function waitUntil(predicate, ms = 10000, what = 'condition') {
  const start = Date.now();
  while (!(await predicate())) {
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/// Resolves with the first event `name` on `emitter` (ably EventEmitter), or rejects.
export function once(emitter, name, ms = 10000) {
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${name}`)), ms);
    emitter.once(name, (arg) => { clearTimeout(timer); resolvePromise(arg); });
  });
}

export async function connected(client) {
  if (client.connection.state !== 'connected') await once(client.connection, 'connected');
  return client;
}

/// One tern per test file: starts it before the tests, closes every client made with
/// `realtime()` and stops the server after them.
export function ternSuite(config = testConfig()) {
  const clients = [];
  const suite = {
    tern: null,
    get port() { return suite.tern.port; },
    /// A realtime client for this suite's server (or `port`, e.g. a proxy's).
    realtime(extra, port = suite.port) {
      const client = new Ably.Realtime(options(port, extra));
      clients.push(client);
      return client;
    },
  };
  before(async () => { suite.tern = await startTern(config); });
  after(async () => {
    for (const client of clients) client.close();
    await suite.tern.stop();
  });
  return suite;
}
