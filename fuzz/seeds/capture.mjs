// Seeds the fuzz corpora from real SDK traffic: ably-js (tests/js) against a spawned
// tern, through a logging HTTP proxy (REST bodies, tokens, Link headers), with ably-js's
// WebSocket library patched to record every frame both ways (JSON and msgpack).
//
//   (cd tests/js && npm ci) && cargo build -p tern-server
//   node fuzz/seeds/capture.mjs            # writes fuzz/corpus/<target>/sdk-*
//
// Loopback only; the scenario is bounded (a few dozen operations) and tern is stopped
// by its PID at the end. Real inputs are kept short (< 4 KB) and de-duplicated by hash.
import { createRequire } from 'node:module';
import { createHash } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, '..', '..');
const corpus = join(repo, 'fuzz', 'corpus');
const require = createRequire(join(repo, 'tests', 'js', 'package.json'));
const WebSocket = require('ws');
const Ably = require('ably');
const { startTern } = await import(join(repo, 'tests', 'js', 'lib', 'tern.mjs'));

// The fuzz harnesses' key (fuzz/src/auth.rs): tokens captured here verify there.
const KEY = 'fuzz.key:fuzzsecret';
const CAPABILITY = '{"chat:*":["*"],"news":["subscribe","history"],"[*]*":["subscribe"]}';
const INPUT_BYTES_MAX = 4096;
const seeds = new Map(); // target -> Map(hash -> bytes)

function keep(target, data) {
  const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
  if (bytes.length === 0 || bytes.length > INPUT_BYTES_MAX) return;
  if (!seeds.has(target)) seeds.set(target, new Map());
  const hash = createHash('sha1').update(bytes).digest('hex').slice(0, 16);
  seeds.get(target).set(hash, bytes);
}

// What a frame carries that other decoders take: channel names, serials, tokens.
function frameParts(frame) {
  if (typeof frame.channel === 'string') keep('channel_name', frame.channel);
  if (typeof frame.channelSerial === 'string') keep('channel_serial', frame.channelSerial);
  if (frame.params?.rewind) keep('channel_name', String(frame.params.rewind));
  if (frame.auth?.accessToken) keep('tern_token', frame.auth.accessToken);
}

// Every frame ably-js sends or receives, as the bytes on the wire.
const wsSend = WebSocket.prototype.send;
WebSocket.prototype.send = function send(data, ...rest) {
  recordFrame(Buffer.isBuffer(data) || typeof data === 'string' ? data : Buffer.from(data), typeof data === 'string');
  return wsSend.call(this, data, ...rest);
};
const wsEmit = WebSocket.prototype.emit;
WebSocket.prototype.emit = function emit(event, ...args) {
  if (event === 'message') recordFrame(args[0], !args[1]);
  return wsEmit.call(this, event, ...args);
};

const msgpack = require('@ably/msgpack-js');

function recordFrame(data, isText) {
  const bytes = Buffer.from(data);
  if (isText) {
    keep('realtime_json', bytes);
    try { frameParts(JSON.parse(bytes.toString())); } catch { /* not JSON */ }
  } else {
    keep('realtime_msgpack', bytes);
    try { if (msgpack) frameParts(msgpack.decode(bytes)); } catch { /* not msgpack */ }
  }
}

// A reverse proxy that records REST request and response bodies and passes WebSocket
// upgrades through untouched.
function startProxy(targetPort) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const url = new URL(req.url, 'http://x');
      recordRequest(req.method, url, body);
      const upstream = http.request({ host: '127.0.0.1', port: targetPort, method: req.method, path: req.url, headers: req.headers }, (up) => {
        const back = [];
        up.on('data', (c) => back.push(c));
        up.on('end', () => {
          const answer = Buffer.concat(back);
          recordResponse(url, up.headers, answer);
          res.writeHead(up.statusCode, up.headers);
          res.end(answer);
        });
      });
      upstream.on('error', () => res.destroy());
      upstream.end(body);
    });
  });
  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url, 'http://x');
    for (const name of ['accessToken', 'access_token']) if (url.searchParams.get(name)) keep('tern_token', url.searchParams.get(name));
    const upstream = net.connect(targetPort, '127.0.0.1', () => {
      const lines = [`${req.method} ${req.url} HTTP/${req.httpVersion}`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstream.write(`${lines.join('\r\n')}\r\n\r\n`);
      upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    const close = () => { socket.destroy(); upstream.destroy(); };
    socket.on('error', close);
    upstream.on('error', close);
  });
  return new Promise((r) => server.listen(0, '127.0.0.1', () => r(server)));
}

function recordRequest(method, url, body) {
  const segments = url.pathname.split('/').map(decodeURIComponent);
  if (segments[1] === 'channels' && segments[2]) keep('channel_name', segments[2]);
  if (url.searchParams.get('page')) keep('page_position', url.searchParams.get('page'));
  for (const name of ['from_serial', 'fromSerial']) if (url.searchParams.get(name)) keep('channel_serial', url.searchParams.get(name));
  if (method !== 'POST' || body.length === 0) return;
  if (segments[1] === 'keys') keep('token_request', body);
  if (segments[1] === 'channels' && segments[3] === 'messages') keep('rest_messages', body);
}

function recordResponse(url, headers, body) {
  const link = headers.link || '';
  for (const m of link.matchAll(/[?&]page=([^&>]+)/g)) keep('page_position', decodeURIComponent(m[1]));
  for (const m of link.matchAll(/[?&]from_serial=([^&>]+)/g)) keep('channel_serial', decodeURIComponent(m[1]));
  if (url.pathname.startsWith('/keys/')) {
    try {
      const details = (headers['content-type'] || '').includes('msgpack') && msgpack ? msgpack.decode(body) : JSON.parse(body);
      if (details.token) keep('tern_token', details.token);
    } catch { /* an error body */ }
  }
  if (url.pathname.endsWith('/messages') && (headers['content-type'] || '').includes('json')) {
    // History pages: arrays of messages as a REST publisher could send them back.
    keep('rest_messages', body);
  }
}

const config = `
[server]
host = "127.0.0.1"
port = 0

[history]
mode = "memory"

[[apps]]
id = "fuzz"

[[apps.keys]]
id = "key"
secret = "fuzzsecret"
capability = '${CAPABILITY}'
`;

const wait = (ms) => new Promise((r) => setTimeout(r, ms));

function once(emitter, name, ms = 10000) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`timed out waiting for ${name}`)), ms);
    emitter.once(name, (arg) => { clearTimeout(timer); ok(arg); });
  });
}

async function scenario(port, binary) {
  const base = { endpoint: '127.0.0.1', port, tls: false, disableConnectivityCheck: true, fallbackHosts: [], logLevel: 0, useBinaryProtocol: binary };
  const label = binary ? 'mp' : 'js';
  const rest = new Ably.Rest({ ...base, key: KEY });
  const realtime = new Ably.Realtime({ ...base, key: KEY, clientId: `alice-${label}` });
  await once(realtime.connection, 'connected');

  const chat = realtime.channels.get(`chat:room-${label}`);
  const got = [];
  await chat.subscribe((m) => got.push(m));
  await chat.publish('text', 'hello');
  await chat.publish('json', { nested: { list: [1, 2.5, true, null], text: 'é😀' } });
  await chat.publish('binary', Buffer.from([0, 1, 2, 253, 254, 255]));
  await chat.publish([{ name: 'batch', data: 'one', id: `${label}-id:0` }, { name: 'batch', data: 'two', extras: { headers: { k: 'v' } } }]);
  await chat.presence.enter({ status: 'here' });
  await chat.presence.update('busy');
  await chat.presence.get();
  await chat.presence.leave();

  await rest.channels.get(`chat:rest-${label}`).publish('r', 'rest body');
  await rest.channels.get(`chat:rest-${label}`).publish([{ name: 'a', data: 'x' }, { name: 'b', data: Buffer.from('bin') }]);
  await rest.channels.get(`chat:rest-${label}`).publish({ name: 'obj', data: { a: 1 }, clientId: `alice-${label}` });
  for (let i = 0; i < 5; i++) await rest.channels.get(`chat:hist-${label}`).publish('h', `m${i}`);
  let page = await rest.channels.get(`chat:hist-${label}`).history({ limit: 2 });
  while (page.hasNext()) page = await page.next();
  page = await rest.channels.get(`chat:hist-${label}`).history({ limit: 2, direction: 'forwards' });
  await page.next();
  await rest.channels.get(`chat:room-${label}`).presence.history();

  const rewound = realtime.channels.get(`chat:hist-${label}`, { params: { rewind: '3' } });
  await rewound.attach();
  const byTime = realtime.channels.get(`[?rewind=1m]chat:hist-${label}`);
  await byTime.attach();
  const untilAttach = await chat.history({ untilAttach: true });
  if (untilAttach.hasNext()) await untilAttach.next();

  // Tokens: a signed token request, the token it buys, a client that uses it.
  const tokenRequest = await rest.auth.createTokenRequest({ clientId: `bob-${label}`, capability: '{"chat:*":["subscribe","publish"]}', ttl: 600000 });
  const tokenDetails = await rest.auth.requestToken(tokenRequest);
  const tokenClient = new Ably.Realtime({ ...base, token: tokenDetails.token });
  await once(tokenClient.connection, 'connected');
  await tokenClient.channels.get(`chat:room-${label}`).publish('as-token', 'hi');
  await rest.auth.requestToken({ clientId: '*' });
  await rest.auth.requestToken({ ttl: 1000 });
  const viaCallback = new Ably.Realtime({
    ...base,
    authCallback: (params, done) => rest.auth.createTokenRequest({ clientId: `carol-${label}` }).then((r) => done(null, r), done),
  });
  await once(viaCallback.connection, 'connected');

  // Resume: the transport drops, the client resumes and re-attaches with channelSerials.
  realtime.connection.connectionManager.activeProtocol?.getTransport()?.disconnect();
  await once(realtime.connection, 'connected');
  await wait(300);
  await chat.publish('after-resume', 'again');
  await chat.detach();
  await wait(200);

  for (const client of [realtime, tokenClient, viaCallback]) client.close();
  await wait(200);
}

const tern = await startTern(config);
const proxy = await startProxy(tern.port);
try {
  await scenario(proxy.address().port, false);
  await scenario(proxy.address().port, true);
} finally {
  proxy.close();
  await tern.stop();
}

for (const [target, inputs] of seeds) {
  const folder = join(corpus, target);
  mkdirSync(folder, { recursive: true });
  for (const file of readdirSync(folder)) if (file.startsWith('sdk-')) rmSync(join(folder, file));
  for (const [hash, bytes] of inputs) writeFileSync(join(folder, `sdk-${hash}`), bytes);
  console.log(`${target}: ${inputs.size} inputs`);
}
process.exit(0);
