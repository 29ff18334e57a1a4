// Client TLS (`[server.tls]`): ably-js over wss:// and https:// with Basic auth, trusting
// the CA from `tern certs --edge-names` through NODE_EXTRA_CA_CERTS; an untrusted CA is
// refused; SIGHUP reloads the certificate for new connections while open ones go on.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import tls from 'node:tls';
import WebSocket from 'ws';
import { ROOT_KEY, startTern, testConfig, ternBin } from '../lib/tern.mjs';

const here = new URL('.', import.meta.url).pathname;
let tern;
let dir;

/// A fresh CA and certificate for localhost/127.0.0.1 in a new folder.
function certs() {
  const out = mkdtempSync(join(tmpdir(), 'tern-edge-certs-'));
  execFileSync(ternBin, ['certs', '--out', out, '--edge-names', 'localhost,127.0.0.1']);
  return out;
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), 'tern-tls-'));
  const first = certs();
  copyFileSync(join(first, 'edge.pem'), join(dir, 'live.pem'));
  copyFileSync(join(first, 'edge.key'), join(dir, 'live.key'));
  copyFileSync(join(first, 'edge-ca.pem'), join(dir, 'ca-a.pem'));
  const config = testConfig().replace('[server]\n', `[server]\ntls = { cert = "${join(dir, 'live.pem')}", key = "${join(dir, 'live.key')}" }\n`);
  tern = await startTern(config);
});
after(async () => { await tern.stop(); });

/// Runs lib/tls-client.mjs in a child with `env`; resolves with what it printed.
function client(env, channel) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(here, '..', 'lib', 'tls-client.mjs'), String(tern.port), ROOT_KEY, channel], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.on('exit', () => {
      try { resolve(JSON.parse(out.trim().split('\n').pop())); } catch (err) { reject(new Error(`child printed ${out}`)); }
    });
  });
}

/// Whether a TLS handshake with `ca` trusted succeeds and the peer is authorized.
function handshake(ca) {
  return new Promise((resolve) => {
    const socket = tls.connect({ host: '127.0.0.1', port: tern.port, servername: 'localhost', ca }, () => {
      resolve(socket.authorized);
      socket.end();
    });
    socket.on('error', () => resolve(false));
  });
}

test('ably-js publishes and subscribes over wss:// and https:// with Basic auth', async () => {
  // Proves TLS on the client port with the CA trusted the way Node users trust one.
  const result = await client({ NODE_EXTRA_CA_CERTS: join(dir, 'ca-a.pem') }, 'tls-channel');
  assert.equal(result.error, null);
  assert.equal(result.connected, true);
  assert.deepEqual(result.received.sort(), ['over https', 'over wss']);
  assert.deepEqual(result.history.sort(), ['over https', 'over wss']);
});

test('a client that does not trust the CA cannot connect', async () => {
  // Proves the certificate is really verified (nothing falls back to plain HTTP).
  const result = await client({ NODE_EXTRA_CA_CERTS: '' }, 'tls-untrusted');
  assert.equal(result.connected, false);
  assert.ok(result.error);
  assert.equal(await handshake(undefined), false);
});

test('SIGHUP reloads the certificate for new connections; open connections go on', async () => {
  // Proves certificate rotation without dropping connections.
  const caA = readFileSync(join(dir, 'ca-a.pem'));
  const socket = new WebSocket(`wss://localhost:${tern.port}/?key=${encodeURIComponent(ROOT_KEY)}&format=json&v=3`, { ca: caA });
  const frames = [];
  socket.on('message', (data) => frames.push(JSON.parse(String(data))));
  const wait = async (what, predicate) => {
    const deadline = Date.now() + 5000;
    while (!predicate() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(predicate(), what);
  };
  await wait('CONNECTED', () => frames.some((f) => f.action === 4));
  assert.equal(await handshake(caA), true);

  const second = certs();
  copyFileSync(join(second, 'edge.pem'), join(dir, 'live.pem'));
  copyFileSync(join(second, 'edge.key'), join(dir, 'live.key'));
  const caB = readFileSync(join(second, 'edge-ca.pem'));
  tern.child.kill('SIGHUP');
  const deadline = Date.now() + 5000;
  while (!(await handshake(caB)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(await handshake(caB), true, 'new connections get the new certificate');
  assert.equal(await handshake(caA), false, 'and no longer the old one');

  socket.send(JSON.stringify({ action: 10, channel: 'after-reload' }));
  await wait('ATTACHED on the connection opened before the reload', () => frames.some((f) => f.action === 11 && f.channel === 'after-reload'));
  socket.close();
});
