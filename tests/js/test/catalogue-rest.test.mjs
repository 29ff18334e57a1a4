// Bad-input catalogue, REST bodies and headers: each row is one request and the exact
// answer Tern must give (status, Ably code, `x-ably-errorcode`); after each row the
// cluster must still serve a normal client and replicate across regions, and a refused
// publish must have left nothing in the channel's history.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { BASIC, httpRow, startCatalogue } from '../lib/catalogue.mjs';

let cat;
before(async () => { cat = await startCatalogue(); });
after(async () => { await cat.stop(); });

/// A msgpack array32 of `count` empty maps: small on the wire, huge once expanded.
function msgpackEmptyMaps(count) {
  const body = Buffer.alloc(5 + count, 0x80);
  body[0] = 0xdd;
  body.writeUInt32BE(count, 1);
  return body;
}

const json = (value) => ({
  method: 'POST',
  headers: { authorization: BASIC, 'content-type': 'application/json' },
  body: JSON.stringify(value),
});
const big = (n) => 'x'.repeat(n);

const ROWS = [
  {
    name: 'msgpack array of 300,000 empty messages (defect: it stalled replication)',
    channel: 'cat-many-msgpack',
    init: {
      method: 'POST',
      headers: { authorization: BASIC, 'content-type': 'application/x-msgpack' },
      body: msgpackEmptyMaps(300_000),
    },
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'JSON array of 1,001 empty messages (over messages_per_publish_max)',
    channel: 'cat-many-json',
    init: json(Array.from({ length: 1001 }, () => ({}))),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'a 400 KB message id',
    channel: 'cat-id',
    init: json({ id: big(400_000), data: 'd' }),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'a 300-byte message id (over message_id_bytes_max)',
    channel: 'cat-id-300',
    init: json({ id: big(300), data: 'd' }),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'a 70 KB encoding',
    channel: 'cat-encoding',
    init: json({ encoding: big(70_000), data: 'd' }),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'a 70 KB clientId (wildcard key)',
    channel: 'cat-clientid',
    init: json({ clientId: big(70_000), data: 'd' }),
    expect: { status: 400, code: 40009 },
  },
  {
    name: '70 KB of extras',
    channel: 'cat-extras',
    init: json({ extras: { headers: { k: big(70_000) } }, data: 'd' }),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'two 40 KB messages (each under the limit, together over it)',
    channel: 'cat-split',
    init: json([{ data: big(40_000) }, { data: big(40_000) }]),
    expect: { status: 400, code: 40009 },
  },
  {
    name: 'a body that is not JSON',
    channel: 'cat-garbage-json',
    init: { ...json(null), body: '{"data": ' },
    expect: { status: 400, code: 40000 },
  },
  {
    name: 'msgpack that is not a message',
    channel: 'cat-garbage-msgpack',
    init: {
      method: 'POST',
      headers: { authorization: BASIC, 'content-type': 'application/x-msgpack' },
      body: Buffer.from([0xc1, 0xff, 0x00]),
    },
    expect: { status: 400, code: 40000 },
  },
];

for (const row of ROWS) {
  test(`REST row: ${row.name}`, async () => {
    // Proves the exact refusal, that nothing was journaled, and that nobody else noticed.
    await httpRow(cat, { name: row.name, path: `/channels/${row.channel}/messages`, init: row.init, expect: row.expect });
    const history = await fetch(cat.url(`/channels/${row.channel}/messages`), { headers: { authorization: BASIC } });
    assert.equal(history.status, 200);
    assert.deepEqual(await history.json(), [], `${row.name}: a refused publish must store nothing`);
    await cat.stillServes(row.name);
  });
}

test('REST row: the largest accepted publish is accepted, stored once and replicated', async () => {
  // Proves the limits refuse only what is over them: 1,000 messages and 64 KiB in all.
  const messages = Array.from({ length: 1000 }, (_, i) => ({ id: `id-${i}`, data: 'x'.repeat(40) }));
  await httpRow(cat, { name: 'max publish', path: '/channels/cat-max/messages', init: json(messages), expect: { status: 201 } });
  const page = await (await fetch(cat.url('/channels/cat-max/messages?limit=1000', cat.west), { headers: { authorization: BASIC } })).json();
  assert.equal(page.length, 1000);
  await cat.stillServes('max publish');
});

for (const name of [':hell', '::', '[?rewind=1]:x']) {
  test(`REST row: publish to invalid channel name ${JSON.stringify(name)} → 400/40010`, async () => {
    // Proves Ably's channel naming rules on REST, and that nobody else noticed.
    await httpRow(cat, {
      name,
      path: `/channels/${encodeURIComponent(name)}/messages`,
      init: json({ data: 'd' }),
      expect: { status: 400, code: 40010 },
    });
    await cat.stillServes(`invalid name ${name}`);
  });
}

const CREDENTIAL_ROWS = [
  ['an unknown key name (Basic)', { authorization: `Basic ${Buffer.from('this.is:wrong').toString('base64')}` }, 401, 40101],
  ['a wrong secret (Basic)', { authorization: `Basic ${Buffer.from('dev.root:wrong').toString('base64')}` }, 401, 40101],
  ['a malformed Basic header', { authorization: 'Basic %%%' }, 401, 40101],
  ['a garbage bearer token', { authorization: 'Bearer garbage' }, 401, undefined],
  ['a JWT signed with the wrong secret', { authorization: `Bearer ${jwt({ 'x-ably-capability': '{"*":["*"]}' }, 'wrong')}` }, 401, 40144],
  ['a JWT that never expires (exp=1e300)', { authorization: `Bearer ${jwt({ exp: 1e300 })}` }, 401, 40144],
  ['a JWT issued in the future (iat +10 min)', { authorization: `Bearer ${jwt({ iat: Math.floor(Date.now() / 1000) + 600 })}` }, 401, 40144],
  ['a JWT with alg none', { authorization: `Bearer ${jwtNone()}` }, 401, 40144],
];

/// An HS256 JWT for the dev key (or signed with `secret`), issued now, 1 h lifetime.
function jwt(claims, secret = 'dev-secret-change-me') {
  const now = Math.floor(Date.now() / 1000);
  const enc = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = enc({ alg: 'HS256', typ: 'JWT', kid: 'dev.root' });
  const body = enc({ iat: now, exp: now + 3600, ...claims });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

function jwtNone() {
  const enc = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  return `${enc({ alg: 'none', typ: 'JWT', kid: 'dev.root' })}.${enc({ iat: now, exp: now + 3600 })}.`;
}

for (const [name, headers, status, code] of CREDENTIAL_ROWS) {
  test(`REST row: ${name} → ${status}${code ? `/${code}` : ''}`, async () => {
    // Proves bad credentials are refused with the code the SDKs act on, and harm no one.
    const text = await httpRow(cat, {
      name,
      path: '/channels/cat-auth/messages',
      init: { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: '{"data":"d"}' },
      expect: { status, code },
    });
    if (code === undefined) assert.match(String(JSON.parse(text).error?.code), /^401\d\d$/);
    await cat.stillServes(name);
  });
}

test('REST row: a valid JWT for the dev key is accepted', async () => {
  // Proves the JWT rows above are refused for what they vary, not for being JWTs.
  await httpRow(cat, {
    name: 'valid jwt',
    path: '/channels/cat-auth/messages',
    init: { method: 'POST', headers: { authorization: `Bearer ${jwt({})}`, 'content-type': 'application/json' }, body: '{"data":"d"}' },
    expect: { status: 201 },
  });
});

// Per-connection push and unenveloped publishes (`/connections/{id}`, `?enveloped=false`).
const CONNECTION_ROWS = [
  ['GET a malformed connection id', 'GET', '/connections/not-an-id', undefined, 400, 80018],
  ['GET an id with a 65-character node tag', 'GET', `/connections/${'a'.repeat(65)}-AAAAAAAAAAAA`, undefined, 400, 80018],
  ['GET an id of a node not in the cluster', 'GET', '/connections/zzzzzz-AAAAAAAAAAAA', undefined, 404, 80022],
  ['DELETE an id of a node not in the cluster', 'DELETE', '/connections/zzzzzz-AAAAAAAAAAAA', undefined, 404, 80022],
  ['POST to an id of a node not in the cluster', 'POST', '/connections/zzzzzz-AAAAAAAAAAAA/messages', '{"data":"d"}', 404, 80022],
  ['handover that is not JSON', 'POST', '/connections/zzzzzz-AAAAAAAAAAAA/handover', '{', 404, 80022],
  ['unenveloped JSON body that is not JSON', 'POST', '/channels/cat-unenveloped/messages?enveloped=false', '{"a":', 400, 40013],
  ['unenveloped JSON body nested 10,000 deep', 'POST', '/channels/cat-unenveloped/messages?enveloped=false', '['.repeat(10_000), 400, 40013],
  ['unenveloped body of 70 KB (over max_message_size)', 'POST', '/channels/cat-unenveloped/messages?enveloped=false', `"${big(70_000)}"`, 413, 40009],
];

for (const [name, method, path, body, status, code] of CONNECTION_ROWS) {
  test(`REST row: ${name} → ${status}/${code}`, async () => {
    // Proves the exact refusal for per-connection push and unenveloped publishes, that
    // nothing was published, and that nobody else noticed.
    await httpRow(cat, {
      name,
      path,
      init: { method, headers: { authorization: BASIC, 'content-type': 'application/json' }, body },
      expect: { status, code },
    });
    const history = await fetch(cat.url('/channels/cat-unenveloped/messages'), { headers: { authorization: BASIC } });
    assert.deepEqual(await history.json(), [], `${name}: a refused publish must store nothing`);
    await cat.stillServes(name);
  });
}

test('REST row: a handover with a key that resumes nothing is refused and takes nothing', async () => {
  // Proves the cross-node handover is only as strong as the connection key: a guessed
  // secret, a key naming another connection and a body that is not a claim are refused,
  // and the connection stays where it was, connected.
  const { default: Ably } = await import('ably');
  const { connected, options } = await import('../lib/tern.mjs');
  const realtime = await connected(new Ably.Realtime(options(cat.east, { key: 'dev.root:dev-secret-change-me' })));
  try {
    const id = realtime.connection.id;
    const claim = (key) => JSON.stringify({ key, to: 'abcdef-AAAAAAAAAAAA', appId: 'dev', clientId: null });
    const rows = [
      ['guessed secret', claim(`${id}!${'x'.repeat(20)}`), 404, 80008],
      ['key of another connection', claim(`${id.split('-')[0]}-BBBBBBBBBBBB!${'x'.repeat(20)}`), 400, 40000],
      ['not a claim', '{"key":1}', 400, 40000],
      ['not JSON', '{', 400, 40000],
    ];
    for (const [name, body, status, code] of rows) {
      await httpRow(cat, {
        name: `handover: ${name}`,
        path: `/connections/${id}/handover`,
        init: { method: 'POST', headers: { 'content-type': 'application/json' }, body },
        expect: { status, code },
      });
    }
    const state = await (await fetch(cat.url(`/connections/${id}`, cat.west), { headers: { authorization: BASIC } })).json();
    assert.equal(state.state, 'connected');
    assert.equal(realtime.connection.state, 'connected');
    await cat.stillServes('handover rows');
  } finally {
    realtime.close();
  }
});
