// Ably JWTs through ably-js, with no stand-in for Ably's hosts: plain JWTs from an
// authUrl and an authCallback, JWTs embedding a token (x-ably-token), encrypted ones
// (JWE, dir + A256GCM under SHA-256 of the key secret) and the refusals that go with
// them. Every JWT is made here with node's crypto, as an auth server would.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createCipheriv, createHash, createHmac, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import Ably from 'ably';
import { LIMITED_KEY, ROOT_KEY, connected, once, options, ternSuite } from '../lib/tern.mjs';

const suite = ternSuite();
const [ROOT_NAME, ROOT_SECRET] = ROOT_KEY.split(':');

const b64 = (value) =>
  (Buffer.isBuffer(value) ? value : Buffer.from(typeof value === 'string' ? value : JSON.stringify(value))).toString('base64url');
const nowS = () => Math.floor(Date.now() / 1000);

function sign(header, claims, secret) {
  const input = `${b64(header)}.${b64(claims)}`;
  return `${input}.${createHmac('sha256', secret).update(input).digest('base64url')}`;
}

/// A plain Ably JWT under `key` ("name:secret").
function ablyJwt(key, claims) {
  const [kid, secret] = key.split(':');
  return sign({ typ: 'JWT', alg: 'HS256', kid }, { iat: nowS(), exp: nowS() + 600, ...claims }, secret);
}

/// A JWT from another issuer (its own secret, no kid) carrying `token` in its header.
function embedding(token, claims = {}) {
  return sign({ typ: 'JWT', alg: 'HS256', 'x-ably-token': token }, { iat: nowS(), ...claims }, 'not an Ably secret');
}

/// `jws` as a compact JWE under the key `name`/`secret`.
function encrypt(jws, name, secret) {
  const header = b64({ alg: 'dir', enc: 'A256GCM', kid: name, cty: 'JWT' });
  const iv = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', createHash('sha256').update(secret).digest(), iv);
  cipher.setAAD(Buffer.from(header));
  const ciphertext = Buffer.concat([cipher.update(jws), cipher.final()]);
  return `${header}..${b64(iv)}.${b64(ciphertext)}.${b64(cipher.getAuthTag())}`;
}

const rest = (extra) => new Ably.Rest(options(suite.port, extra));

/// The server's refusal of `token` on a REST request, as {code, statusCode}: asked
/// directly, because ably-js answers a token error on a token it cannot renew with its
/// own 40171.
async function refusal(token) {
  const res = await fetch(`http://127.0.0.1:${suite.port}/stats`, {
    headers: { authorization: `Bearer ${Buffer.from(token).toString('base64')}` },
  });
  const { error } = await res.json();
  assert.equal(res.status, error.statusCode);
  return { code: error.code, statusCode: error.statusCode };
}

// An auth server on loopback answering every GET with a fresh JWT (application/jwt)
// for the clientId it is asked for; it counts its requests.
let authServer;
let authRequests = 0;
before(async () => {
  authServer = createServer((req, res) => {
    authRequests++;
    const clientId = new URL(req.url, 'http://auth').searchParams.get('clientId');
    const token = ablyJwt(LIMITED_KEY, { 'x-ably-clientId': clientId, 'x-ably-capability': '{"allowed:*":["*"]}' });
    res.writeHead(200, { 'content-type': 'application/jwt' }).end(token);
  });
  await new Promise((done) => authServer.listen(0, '127.0.0.1', done));
});
after(() => authServer.close());

test('an authUrl answering application/jwt: connected as its clientId, held to its capability', async () => {
  // Proves RSA8g with JWTs end to end: the claims set the identity, the key narrows them.
  const authUrl = `http://127.0.0.1:${authServer.address().port}/jwt`;
  const client = await connected(suite.realtime({ key: undefined, authUrl, authParams: { clientId: 'jwt-url' } }));
  assert.equal(client.auth.clientId, 'jwt-url');
  const channel = client.channels.get('allowed:jwt');
  const got = new Promise((resolve) => channel.subscribe((m) => resolve(m)));
  await channel.publish('n', 'via authUrl');
  assert.equal((await got).clientId, 'jwt-url');
  // The claim asked for allowed:* only and the limited key holds readonly:* as subscribe.
  await assert.rejects(client.channels.get('readonly:x').publish('n', 'd'), (e) => e.code === 40160);
  const before = authRequests;
  await client.auth.authorize();
  assert.equal(authRequests, before + 1, 'authorize() fetched a new JWT');
  assert.equal(client.connection.state, 'connected');
});

test('an expiring JWT from an authCallback is renewed: DISCONNECTED 40142, then connected again', async () => {
  // Proves JWT expiry is enforced on a live connection and the SDK recovers by itself.
  let calls = 0;
  const authCallback = (_params, callback) => {
    calls++;
    callback(null, ablyJwt(ROOT_KEY, { exp: nowS() + (calls === 1 ? 2 : 600), 'x-ably-clientId': 'renewer' }));
  };
  const client = await connected(suite.realtime({ key: undefined, authCallback }));
  const change = await once(client.connection, 'disconnected', 10000);
  assert.equal(change.reason.code, 40142);
  await once(client.connection, 'connected', 10000);
  assert.equal(calls, 2);
  assert.equal(client.auth.clientId, 'renewer');
});

test('a JWT embedding a token acts as that token, whoever signed the outer JWT', async () => {
  // Proves x-ably-token: the inner token's clientId and capability, not the outer claims'.
  const inner = await rest().auth.requestToken({ clientId: 'inside', capability: { 'embed:*': ['publish', 'subscribe'] } });
  const token = embedding(inner.token, { exp: nowS() + 300, 'x-ably-clientId': 'outside', 'x-ably-capability': '{"*":["*"]}' });
  const client = await connected(suite.realtime({ key: undefined, token }));
  assert.equal(client.auth.clientId, 'inside');
  await client.channels.get('embed:a').publish('n', 'd');
  await assert.rejects(client.channels.get('other').attach(), (e) => e.code === 40160);
  await rest({ key: undefined, token }).channels.get('embed:b').publish('n', 'd');
  assert.equal((await rest().channels.get('embed:b').history()).items[0].clientId, 'inside');
});

test('an embedding JWT may not outlive its token; an expired token inside fails as expired', async () => {
  // Proves Ably's rule for unencrypted embedding (40144) and that the inner expiry binds.
  const inner = await rest().auth.requestToken({ ttl: 60_000 });
  const outlives = embedding(inner.token, { exp: Math.ceil(inner.expires / 1000) + 60 });
  assert.deepEqual(await refusal(outlives), { code: 40144, statusCode: 401 });
  const short = await rest().auth.requestToken({ ttl: 1000 });
  await new Promise((resolve) => setTimeout(resolve, 1200));
  assert.deepEqual(await refusal(embedding(short.token)), { code: 40142, statusCode: 401 });
});

test('an encrypted JWT (JWE) embedding a token works over REST and realtime; a tampered one is 40144', async () => {
  // Proves decryption under the kid key, and that the AEAD tag is checked.
  const inner = await rest().auth.requestToken({ clientId: 'sealed' });
  const token = encrypt(embedding(inner.token, { exp: nowS() + 300 }), ROOT_NAME, ROOT_SECRET);
  await rest({ key: undefined, token }).channels.get('jwe').publish('n', 'd');
  const client = await connected(suite.realtime({ key: undefined, token }));
  assert.equal(client.auth.clientId, 'sealed');
  const parts = token.split('.');
  const flipped = Buffer.from(parts[3], 'base64url');
  flipped[0] ^= 1;
  parts[3] = b64(flipped);
  assert.deepEqual(await refusal(parts.join('.')), { code: 40144, statusCode: 401 });
  const wrongKey = encrypt(embedding(inner.token), ROOT_NAME, 'not the secret');
  assert.deepEqual(await refusal(wrongKey), { code: 40144, statusCode: 401 });
});

test('a JWT for an app this server does not have is 404/40400, and the SDK does not retry it', { timeout: 20000 }, async () => {
  // Proves the refusal ably-js treats as final (not a token error to renew on).
  let calls = 0;
  const token = ablyJwt('invalid.invalid:invalidinvalid', {});
  const authCallback = (_params, callback) => {
    calls++;
    callback(null, token);
  };
  await assert.rejects(rest({ key: undefined, authCallback }).stats(), (e) => e.code === 40400 && e.statusCode === 404);
  assert.equal(calls, 1);
  const client = suite.realtime({ key: undefined, token });
  const change = await once(client.connection, 'failed', 10000);
  assert.equal(change.reason.code, 40400);
});
