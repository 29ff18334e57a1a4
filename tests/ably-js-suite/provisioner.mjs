// A local stand-in for Ably's sandbox app provisioning, as ably-js's test suite uses it
// (test/common/modules/testapp_manager.js with ABLY_LOCAL_SANDBOX_URL):
//
//   POST /apps          body = post_apps of test-app-setup.json. Starts one `tern serve`
//                       for the app (its own port, in-memory history), enters the fixture
//                       channels' presence members, and answers {appId, keys, namespaces,
//                       channels, endpoint, port, tls: false}.
//   DELETE /apps/{id}   Basic auth with the app's first key: stops that app's tern.
//   POST /stats         fixture statistics, forwarded to the app's tern ([stats] fixtures =
//                       true in its config), which stores them as Ably's sandbox does.
//
// Standalone: `node provisioner.mjs [--port N] [--suite DIR]` prints
// `provisioner listening on http://127.0.0.1:PORT` and runs until SIGINT/SIGTERM.
// As a module, `startSandbox()` serves one sandbox; the runner gives every mocha process
// its own, so the apps a crashed process leaves behind are stopped with its sandbox.
// Every tern started is stopped by its PID: on DELETE, on close(), and on process exit.
import { execFileSync, spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, openSync, closeSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');

/// Largest POST /apps or /stats body accepted (the suite's are a few KiB).
const BODY_BYTES_MAX = 1 << 20;
/// How long a tern may take to print its listening line.
const START_TIMEOUT_MS = 20_000;
/// How long seeding the fixture channels' presence may take.
const SEED_TIMEOUT_MS = 10_000;
/// SIGTERM, then SIGKILL after this long.
const STOP_GRACE_MS = 3_000;
/// Ably's full capability: what a key without one gets.
const CAPABILITY_ALL = '{"*":["*"]}';

/// PIDs of every tern started by this process, for the last-resort kill on exit.
const livePids = new Set();
process.on('exit', () => {
  for (const pid of livePids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
});

function randomName(bytes) {
  return randomBytes(bytes).toString('base64url').replace(/[^A-Za-z0-9]/g, 'x');
}

/// A TOML basic string: JSON's escapes are a subset of TOML's for these values.
function tomlString(s) {
  return JSON.stringify(s);
}

/// The app described by a POST /apps body: ids, secrets and capabilities for its keys.
export function planApp(body) {
  const appId = `app${randomName(6)}`;
  const keys = (body.keys || []).map((spec, i) => {
    const id = `key${i}`;
    const secret = randomName(18);
    const keyName = `${appId}.${id}`;
    const capability = spec.capability || CAPABILITY_ALL;
    const revocableTokens = spec.revocableTokens === true;
    return { id, value: secret, keyName, keySecret: secret, keyStr: `${keyName}:${secret}`, capability, revocableTokens };
  });
  const presenceMax = body.limits?.presence?.maxMembers;
  return {
    appId,
    accountId: `acct${randomName(6)}`,
    keys,
    // Tern keeps history for every channel, so `persisted` needs no setting; the other
    // namespace flags (push, mutable messages) name features Tern lacks.
    namespaces: (body.namespaces || []).map((ns) => ({ ...ns })),
    channels: body.channels || [],
    presenceMax: Number.isInteger(presenceMax) && presenceMax > 0 ? presenceMax : null,
  };
}

/// `config` with `extra` TOML merged in: a `[server]` section in `extra` has its keys
/// added to the config's own `[server]` (TOML allows a table once), the rest appended.
function withExtra(config, extra) {
  const server = /^\[server\]\n((?:[^[\n].*\n?)*)/m.exec(extra);
  if (!server) return config + extra;
  const rest = extra.replace(server[0], '');
  return config.replace('[server]\n', `[server]\n${server[1]}`) + '\n' + rest;
}

/// The `tern serve` config for an app: loopback, any free port, history in memory.
export function ternConfig(app) {
  const lines = ['[server]', 'host = "127.0.0.1"', 'port = 0', ''];
  if (app.presenceMax) lines.push('[limits]', `presence_members_max = ${app.presenceMax}`, '');
  // The sandbox may inject fixture statistics (POST /stats), as Ably's does.
  lines.push('[stats]', 'fixtures = true', '');
  lines.push('[history]', 'mode = "memory"', '', '[[apps]]', `id = ${tomlString(app.appId)}`, '');
  for (const key of app.keys) {
    lines.push(
      '[[apps.keys]]',
      `id = ${tomlString(key.id)}`,
      `secret = ${tomlString(key.keySecret)}`,
      `capability = ${tomlString(key.capability)}`,
      ...(key.revocableTokens ? ['revocable_tokens = true'] : []),
      '',
    );
  }
  return lines.join('\n');
}

/// With TERN_SUITE_NODES=2 every app runs on a two-region cluster (issue 11: clustering
/// must be invisible to the SDK): two `tern serve` nodes in regions `r1` and `r2` on
/// loopback, mutual-TLS QUIC from `tern certs`, no WAN delay, `ack_replicas = 1`; the
/// clients all use the first node.
const CLUSTER_NODES = Number(process.env.TERN_SUITE_NODES || 1);

async function freeUdpPort() {
  const socket = createSocket('udp4');
  await new Promise((done) => socket.bind(0, '127.0.0.1', done));
  const { port } = socket.address();
  await new Promise((done) => socket.close(done));
  return port;
}

/// The `[cluster]` section of node `index` (0-based) of a cluster whose certificates are
/// in `certs`; `seed` is the first node's gossip address (none for the first node).
function clusterSection(index, certs, gossipPort, seed) {
  const node = `n${index + 1}`;
  return [
    '[cluster]',
    `region = "r${index + 1}"`,
    'quic_listen = "127.0.0.1:0"',
    `gossip_listen = "127.0.0.1:${gossipPort}"`,
    `seeds = [${seed ? `"${seed}"` : ''}]`,
    'ack_replicas = 1',
    `ca_cert = ${tomlString(join(certs, 'ca.pem'))}`,
    `cert = ${tomlString(join(certs, `${node}.pem`))}`,
    `key = ${tomlString(join(certs, `${node}.key`))}`,
    `gossip_key = ${tomlString(join(certs, 'gossip.key'))}`,
    '',
  ].join('\n');
}

/// Starts the app's nodes (one, or a cluster, see CLUSTER_NODES); resolves with
/// {children, port} (the first node's port) once every node listens and, in a cluster,
/// the first node sees every region.
async function startNodes(ternBin, app, dir) {
  if (CLUSTER_NODES <= 1) {
    const { child, port } = await startTern(ternBin, app, dir);
    return { children: [child], port };
  }
  const certs = join(dir, 'certs');
  const names = Array.from({ length: CLUSTER_NODES }, (_, i) => `n${i + 1}`);
  execFileSync(ternBin, ['certs', '--out', certs, '--nodes', names.join(',')], { stdio: 'ignore' });
  const children = [];
  let seed = null;
  let first = null;
  let firstAdmin = null;
  for (const [index, node] of names.entries()) {
    const gossip = await freeUdpPort();
    const nodeDir = join(dir, node);
    mkdirSync(nodeDir, { recursive: true });
    const extra = `\n[server]\nserver_id = "${node}"\n` + clusterSection(index, certs, gossip, seed);
    const { child, port, admin } = await startTern(ternBin, app, nodeDir, extra);
    children.push(child);
    first = first ?? port;
    firstAdmin = firstAdmin ?? admin;
    seed = seed ?? `127.0.0.1:${gossip}`;
  }
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    const body = await (await fetch(`http://127.0.0.1:${firstAdmin}/regions`)).json().catch(() => ({}));
    if ((body.regions || []).length === CLUSTER_NODES) break;
    if (Date.now() > deadline) {
      await Promise.all(children.map(stopTern));
      throw new Error(`the ${CLUSTER_NODES}-node cluster for ${app.appId} did not form`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return { children, port: first };
}

/// Starts `tern serve` for `app` in `dir` (its config plus `extra` TOML); resolves with
/// {child, port} once it listens.
function startTern(ternBin, app, dir, extra = '') {
  const configPath = join(dir, 'tern.toml');
  writeFileSync(configPath, withExtra(ternConfig(app), extra));
  const logFd = openSync(join(dir, 'tern.log'), 'a');
  const child = spawn(ternBin, ['serve', '--config', configPath, '--port', '0'], {
    cwd: dir,
    stdio: ['ignore', 'pipe', logFd],
    env: { ...process.env, TERN_LOG: process.env.TERN_LOG || 'warn' },
  });
  closeSync(logFd);
  livePids.add(child.pid);
  child.once('exit', () => livePids.delete(child.pid));
  return new Promise((resolvePort, reject) => {
    let out = '';
    const fail = (why) => {
      clearTimeout(timer);
      stopTern(child);
      reject(new Error(`tern for ${app.appId}: ${why} (log: ${join(dir, 'tern.log')})`));
    };
    const timer = setTimeout(() => fail(`no listening line in ${START_TIMEOUT_MS} ms`), START_TIMEOUT_MS);
    child.once('exit', (code, signal) => fail(`exited (${code ?? signal})`));
    child.once('error', (err) => fail(err.message));
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const found = /tern listening on http:\/\/[^:\s]+:(\d+)/.exec(out);
      if (!found) return;
      clearTimeout(timer);
      child.removeAllListeners('exit');
      child.once('exit', () => livePids.delete(child.pid));
      child.stdout.removeAllListeners('data');
      child.stdout.resume();
      const admin = /tern admin on http:\/\/[^:\s]+:(\d+)/.exec(out);
      resolvePort({ child, port: Number(found[1]), admin: admin && Number(admin[1]) });
    });
  });
}

/// SIGTERM, then SIGKILL after STOP_GRACE_MS; resolves when the process has exited.
function stopTern(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((done) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_GRACE_MS);
    child.once('exit', () => {
      clearTimeout(timer);
      done();
    });
    child.kill('SIGTERM');
  });
}

/// Enters every fixture channel's presence members through Tern's own realtime protocol:
/// one WebSocket, authenticated with the app's first key, entering each member with its
/// `data` and `encoding` as given (ably-js would re-encode them). The socket stays open,
/// so the members stay present until the app is deleted. Resolves with the socket.
function seedPresence(WebSocket, port, app) {
  const fixtures = app.channels.filter((ch) => Array.isArray(ch.presence) && ch.presence.length > 0);
  if (fixtures.length === 0) return Promise.resolve(null);
  const key = app.keys[0].keyStr;
  const url = `ws://127.0.0.1:${port}/?key=${encodeURIComponent(key)}&format=json&v=5&heartbeats=true`;
  const ws = new WebSocket(url);
  return new Promise((done, reject) => {
    const fail = (why) => {
      clearTimeout(timer);
      ws.terminate();
      reject(new Error(`seeding presence for ${app.appId}: ${why}`));
    };
    const timer = setTimeout(() => fail(`not done in ${SEED_TIMEOUT_MS} ms`), SEED_TIMEOUT_MS);
    const attached = new Set();
    let msgSerial = 0;
    let acked = 0;
    const send = (frame) => ws.send(JSON.stringify(frame));
    ws.on('error', (err) => fail(err.message));
    ws.on('close', () => fail('socket closed'));
    ws.on('message', (raw) => {
      const frame = JSON.parse(raw.toString());
      switch (frame.action) {
        case 4: // CONNECTED
          for (const ch of fixtures) send({ action: 10, channel: ch.name });
          break;
        case 11: // ATTACHED
          if (attached.has(frame.channel)) break;
          attached.add(frame.channel);
          send({
            action: 14, // PRESENCE
            channel: frame.channel,
            msgSerial: msgSerial++,
            presence: fixtures
              .find((ch) => ch.name === frame.channel)
              .presence.map((m) => ({ action: 2, clientId: m.clientId, data: m.data, encoding: m.encoding })),
          });
          break;
        case 1: // ACK
          acked += frame.count || 1;
          if (acked >= fixtures.length) {
            clearTimeout(timer);
            ws.removeAllListeners('close');
            ws.on('close', () => {});
            done(ws);
          }
          break;
        case 2: // NACK
        case 9: // ERROR
          fail(`${frame.action === 2 ? 'NACK' : 'ERROR'} ${JSON.stringify(frame.error)}`);
          break;
        default:
          break;
      }
    });
  });
}

function readBody(req) {
  return new Promise((done, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > BODY_BYTES_MAX) {
        reject(new Error(`body larger than ${BODY_BYTES_MAX} bytes`));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => done(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function reply(res, status, body) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function basicKey(req) {
  const header = req.headers.authorization || '';
  if (!header.startsWith('Basic ')) return null;
  return Buffer.from(header.slice(6), 'base64').toString('utf8');
}

/// Serves one sandbox on 127.0.0.1:`port` (0 = any). `suiteDir` is the installed suite
/// (its node_modules has `ws`); `ternBin` the binary; `workDir` where each app's config
/// and tern log go. Resolves with {url, port, close()}.
export async function startSandbox({
  port = 0,
  suiteDir = join(repo, 'target', 'ably-js-suite'),
  ternBin = process.env.TERN_BIN || join(repo, 'target', 'debug', 'tern'),
  workDir = mkdtempSync(join(tmpdir(), 'tern-sandbox-')),
  log = () => {},
} = {}) {
  const WebSocket = createRequire(join(suiteDir, 'package.json'))('ws');
  mkdirSync(workDir, { recursive: true });
  /// appId → {app, child, socket, dir}
  const apps = new Map();
  const starting = new Set();

  async function createApp(body) {
    const app = planApp(body);
    const dir = join(workDir, app.appId);
    mkdirSync(dir, { recursive: true });
    const { children, port: ternPort } = await startNodes(ternBin, app, dir);
    const entry = { app, children, socket: null, dir, port: ternPort };
    apps.set(app.appId, entry);
    entry.socket = await seedPresence(WebSocket, ternPort, app);
    log(`app ${app.appId}: tern pids ${children.map((c) => c.pid).join(',')}, clients on port ${ternPort}`);
    const { presenceMax, ...answer } = app;
    return { ...answer, endpoint: '127.0.0.1', port: ternPort, tls: false };
  }

  async function deleteApp(appId) {
    const entry = apps.get(appId);
    if (!entry) return;
    apps.delete(appId);
    if (entry.socket) entry.socket.terminate();
    await Promise.all(entry.children.map(stopTern));
    log(`app ${appId}: stopped`);
  }

  async function handle(req, res) {
    const path = new URL(req.url, 'http://sandbox').pathname;
    if (req.method === 'POST' && path === '/apps') {
      const body = JSON.parse((await readBody(req)) || '{}');
      const job = createApp(body);
      starting.add(job);
      try {
        reply(res, 201, await job);
      } finally {
        starting.delete(job);
      }
      return;
    }
    const del = /^\/apps\/([^/]+)$/.exec(path);
    if (req.method === 'DELETE' && del) {
      const entry = apps.get(del[1]);
      if (!entry) return reply(res, 404, { error: { code: 40400, statusCode: 404, message: 'no such app' } });
      if (basicKey(req) !== entry.app.keys[0].keyStr) {
        return reply(res, 401, { error: { code: 40101, statusCode: 401, message: 'wrong key' } });
      }
      await deleteApp(del[1]);
      return reply(res, 204);
    }
    if (req.method === 'POST' && path === '/stats') {
      // Fixtures go to the app whose key signs the request, whose tern stores them.
      const body = await readBody(req);
      const key = basicKey(req);
      const entry = [...apps.values()].find((e) => e.app.keys.some((k) => k.keyStr === key));
      if (!entry) return reply(res, 401, { error: { code: 40101, statusCode: 401, message: 'no app has this key' } });
      const answer = await fetch(`http://127.0.0.1:${entry.port}/stats`, {
        method: 'POST',
        headers: { authorization: req.headers.authorization, 'content-type': 'application/json' },
        body,
      });
      res.writeHead(answer.status, { 'content-type': answer.headers.get('content-type') || 'application/json' });
      return res.end(Buffer.from(await answer.arrayBuffer()));
    }
    reply(res, 404, { error: { code: 40400, statusCode: 404, message: `no route ${req.method} ${path}` } });
  }

  const server = createServer((req, res) => {
    handle(req, res).catch((err) => {
      log(`${req.method} ${req.url}: ${err.message}`);
      if (!res.headersSent) reply(res, 500, { error: { code: 50000, statusCode: 500, message: err.message } });
    });
  });
  await new Promise((done) => server.listen(port, '127.0.0.1', done));
  const bound = server.address().port;
  return {
    url: `http://127.0.0.1:${bound}`,
    port: bound,
    workDir,
    /// Stops the listener and every app's tern (waits for apps still starting).
    async close() {
      server.close();
      server.closeAllConnections();
      await Promise.allSettled([...starting]);
      await Promise.all([...apps.keys()].map(deleteApp));
    },
  };
}

async function main() {
  const args = process.argv.slice(2);
  const arg = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const sandbox = await startSandbox({
    port: Number(arg('--port') || 0),
    suiteDir: arg('--suite') ? resolve(arg('--suite')) : undefined,
    log: (line) => console.error(`provisioner: ${line}`),
  });
  console.log(`provisioner listening on ${sandbox.url}`);
  const stop = async () => {
    await sandbox.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
