// Token revocation (Ably RSA17) with ably-js: `auth.revokeTokens` answers per target,
// a revoked token is refused on REST and at connect (40141) and a live connection
// holding it is cut with DISCONNECTED 40141; revocations survive a restart, are bounded
// per app, and reach every region.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import WebSocket from 'ws';
import { once, options, startTern, testConfig } from '../lib/tern.mjs';
import { REGIONS, startRegions } from '../lib/regions.mjs';

const RV_KEY = 'test.rv:rvsecret';
/// A key with revocable tokens beside the test app's others.
const REVOCABLE = `
[[apps.keys]]
id = "rv"
secret = "rvsecret"
capability = '{"*":["*"]}'
revocable_tokens = true
`;

function config(extra = {}) {
  return testConfig(extra) + REVOCABLE;
}

function rest(port, extra = {}) {
  return new Ably.Rest(options(port, { key: RV_KEY, ...extra }));
}

/// A REST publish with only `token` (over fetch: ably-js would try to renew a refused
/// token and report 40171 instead); resolves to the error code (0 on success).
async function publishWith(port, token, host = '127.0.0.1') {
  const res = await fetch(`http://${host}:${port}/channels/revoke-check/messages`, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${Buffer.from(token).toString('base64')}`,
      'content-type': 'application/json',
    },
    body: JSON.stringify({ name: 'n', data: 'd' }),
  });
  if (res.status === 201) return 0;
  const body = await res.json();
  assert.equal(res.status, body.error.statusCode);
  return body.error.code;
}

/// The error code of the first frame a WebSocket connect with `token` gets (0: CONNECTED).
async function connectError(port, token) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/?access_token=${encodeURIComponent(token)}&format=json&v=3`);
  try {
    const frame = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no frame in 10 s')), 10000);
      ws.once('message', (data) => { clearTimeout(timer); resolve(JSON.parse(data.toString())); });
      ws.once('error', reject);
    });
    return frame.error?.code ?? 0;
  } finally {
    ws.close();
  }
}

/// POST /keys/{keyName}/revokeTokens with fetch: status and body.
async function revokeRaw(port, key, body) {
  const [keyName] = key.split(':');
  const res = await fetch(`http://127.0.0.1:${port}/keys/${keyName}/revokeTokens`, {
    method: 'POST',
    headers: {
      authorization: `Basic ${Buffer.from(key).toString('base64')}`,
      'content-type': 'application/json',
    },
    body: JSON.stringify(body),
  });
  return { status: res.status, body: await res.json() };
}

test('revoking a clientId cuts its live connection and refuses its token everywhere', async () => {
  /// Proves RSA17 end to end: per-target results, DISCONNECTED 40141 on a live
  /// connection, 40141 on REST and at connect, other clients untouched, new tokens good.
  const tern = await startTern(config());
  const clients = [];
  try {
    const admin = rest(tern.port);
    const [alice, bob] = await Promise.all([
      admin.auth.requestToken({ clientId: 'alice' }),
      admin.auth.requestToken({ clientId: 'bob' }),
    ]);
    const aliceRt = new Ably.Realtime(options(tern.port, { key: undefined, token: alice }));
    const bobRt = new Ably.Realtime(options(tern.port, { key: undefined, token: bob }));
    clients.push(aliceRt, bobRt);
    await Promise.all([once(aliceRt.connection, 'connected'), once(bobRt.connection, 'connected')]);
    const cut = once(aliceRt.connection, 'disconnected');

    const result = await admin.auth.revokeTokens([
      { type: 'clientId', value: 'alice' },
      { type: 'channel', value: 'x' },
    ]);
    assert.equal(result.successCount, 1);
    assert.equal(result.failureCount, 1);
    assert.equal(result.results[0].target, 'clientId:alice');
    assert.equal(typeof result.results[0].issuedBefore, 'number');
    assert.equal(result.results[1].error.statusCode, 400);

    assert.equal((await cut).reason.code, 40141);
    assert.equal(await publishWith(tern.port, alice.token), 40141);
    assert.equal(await publishWith(tern.port, bob.token), 0);
    assert.equal(bobRt.connection.state, 'connected');

    // At connect (read raw: ably-js turns the refusal of a token it cannot renew into 40171).
    assert.equal(await connectError(tern.port, alice.token), 40141);

    // A token issued after the revocation is not covered by it.
    await new Promise((r) => setTimeout(r, 5));
    const fresh = await admin.auth.requestToken({ clientId: 'alice' });
    assert.equal(await publishWith(tern.port, fresh.token), 0);
  } finally {
    for (const c of clients) c.close();
    await tern.stop();
  }
});

test('only a revocable key revokes, with valid options; allowReauthMargin postpones', async () => {
  /// Proves the refusals (40160 for a key without revocable tokens, 400 for bad targets
  /// and issuedBefore) and that appliesAt is 30 s on with allowReauthMargin.
  const tern = await startTern(config());
  try {
    const plain = await revokeRaw(tern.port, 'test.root:rootsecret', { targets: ['clientId:a'] });
    assert.equal(plain.status, 401);
    assert.equal(plain.body.error.code, 40160);
    const none = await revokeRaw(tern.port, RV_KEY, { targets: [] });
    assert.equal(none.status, 400);
    const many = await revokeRaw(tern.port, RV_KEY, { targets: Array.from({ length: 101 }, (_, i) => `clientId:${i}`) });
    assert.equal(many.status, 400);
    const future = await revokeRaw(tern.port, RV_KEY, { targets: ['clientId:a'], issuedBefore: Date.now() + 3_600_000 });
    assert.equal(future.status, 400);
    const old = await revokeRaw(tern.port, RV_KEY, { targets: ['clientId:a'], issuedBefore: Date.now() - 2 * 3_600_000 });
    assert.equal(old.status, 400);

    const admin = rest(tern.port);
    const carol = await admin.auth.requestToken({ clientId: 'carol' });
    const before = await admin.time();
    const result = await admin.auth.revokeTokens([{ type: 'clientId', value: 'carol' }], { allowReauthMargin: true });
    assert.ok(result.results[0].appliesAt >= before + 30_000);
    // Not yet in force: the margin lets the client renew first.
    assert.equal(await publishWith(tern.port, carol.token), 0);
  } finally {
    await tern.stop();
  }
});

test('revocations per app are bounded', async () => {
  /// Proves `revocations_per_app_max`: the request that would exceed it gets 42910.
  const tern = await startTern(config({ limits: 'revocations_per_app_max = 2' }));
  try {
    const first = await revokeRaw(tern.port, RV_KEY, { targets: ['clientId:a', 'clientId:b'] });
    assert.equal(first.status, 201);
    const over = await revokeRaw(tern.port, RV_KEY, { targets: ['clientId:c'] });
    assert.equal(over.status, 429);
    assert.equal(over.body.error.code, 42910);
  } finally {
    await tern.stop();
  }
});

test('a revocation survives a restart', async () => {
  /// Proves revocations are stored and read back before the node serves again.
  const stored = config({ history: 'mode = "redb"\npath = "data/history.redb"' });
  const first = await startTern(stored);
  let token;
  try {
    const admin = rest(first.port);
    token = (await admin.auth.requestToken({ clientId: 'dave' })).token;
    await admin.auth.revokeTokens([{ type: 'clientId', value: 'dave' }]);
    assert.equal(await publishWith(first.port, token), 40141);
  } finally {
    await first.stop('SIGKILL');
  }
  const second = await startTern(stored, { dir: first.dir });
  try {
    assert.equal(await publishWith(second.port, token), 40141);
  } finally {
    await second.stop();
  }
});

test('a revocation made in one region cuts connections and refuses tokens in the others, and on a later joiner', async () => {
  /// Proves revocations replicate: a client connected to eu-west is cut and ap-south
  /// refuses the token, after a revocation posted to us-east; a node joining later
  /// refuses it too.
  const app = `
[[apps]]
id = "rv"

[[apps.keys]]
id = "k"
secret = "rvsecret"
capability = '{"*":["*"]}'
revocable_tokens = true
`;
  const regions = await startRegions({ extra: app });
  const clients = [];
  const at = (r, extra = {}) => ({
    ...options(regions.port, { key: undefined, ...extra }),
    endpoint: REGIONS[r].host,
  });
  try {
    const admin = new Ably.Rest(at(0, { key: 'rv.k:rvsecret' }));
    const erin = await admin.auth.requestToken({ clientId: 'erin' });
    const far = new Ably.Realtime(at(1, { token: erin }));
    clients.push(far);
    await once(far.connection, 'connected');
    const cut = once(far.connection, 'disconnected', 15000);
    await admin.auth.revokeTokens([{ type: 'clientId', value: 'erin' }]);
    assert.equal((await cut).reason.code, 40141);
    // The third region may take a WAN delay longer to hear of it.
    let code = 0;
    for (let i = 0; i < 100 && code !== 40141; i++) {
      code = await publishWith(regions.port, erin.token, REGIONS[2].host);
      if (code !== 40141) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(code, 40141);

    // A node that joins afterwards learns it from its peers (their logs, via Heads).
    await regions.addNode(1, 1);
    code = 0;
    for (let i = 0; i < 150 && code !== 40141; i++) {
      code = await publishWith(regions.port, erin.token, '127.1.0.2');
      if (code !== 40141) await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(code, 40141);
  } finally {
    for (const c of clients) c.close();
    await regions.stop();
  }
});
