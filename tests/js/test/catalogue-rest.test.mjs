// Bad-input catalogue, REST bodies and headers: each row is one request and the exact
// answer Tern must give (status, Ably code, `x-ably-errorcode`); after each row the
// cluster must still serve a normal client and replicate across regions, and a refused
// publish must have left nothing in the channel's history.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
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
