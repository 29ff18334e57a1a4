// Bad-input catalogue, realtime frames: each row is one frame sent on a raw WebSocket
// (JSON protocol, as a browser SDK speaks it) and the exact answer Tern must give
// (NACK or ERROR with the Ably code, and whether the connection ends); after each row
// the cluster must still serve normal clients and replicate across regions.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { DEV_KEY, startCatalogue } from '../lib/catalogue.mjs';

let cat;
before(async () => { cat = await startCatalogue(); });
after(async () => { await cat.stop(); });

const ACTION = { ACK: 1, NACK: 2, CONNECTED: 4, ERROR: 9, ATTACH: 10, ATTACHED: 11, MESSAGE: 15, PRESENCE: 14 };

/// A raw realtime connection: `next(action)` resolves with the next frame of that
/// action; `closed` resolves when the server closes the socket.
async function raw(port, query = '') {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/?key=${DEV_KEY}&format=json&v=3${query}`);
  const frames = [];
  const waiters = [];
  ws.on('message', (data) => {
    frames.push(JSON.parse(data.toString()));
    for (const w of waiters.splice(0)) w();
  });
  const closed = new Promise((r) => ws.on('close', r));
  const next = async (action, ms = 10000) => {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = frames.findIndex((f) => f.action === action);
      if (i >= 0) return frames.splice(i, 1)[0];
      if (Date.now() > deadline) throw new Error(`no frame with action ${action}; got ${JSON.stringify(frames).slice(0, 300)}`);
      await new Promise((r) => { waiters.push(r); setTimeout(r, 50); });
    }
  };
  await next(ACTION.CONNECTED);
  return { ws, next, closed, send: (f) => ws.send(JSON.stringify(f)) };
}

const big = (n) => 'x'.repeat(n);
const message = (channel, messages) => ({ action: ACTION.MESSAGE, channel, msgSerial: 0, messages });
const presence = (channel, presence) => ({ action: ACTION.PRESENCE, channel, msgSerial: 0, presence });

const NACK_ROWS = [
  ['1,001 messages in one MESSAGE', message('rt-many', Array.from({ length: 1001 }, () => ({})))],
  ['a 400 KB message id', message('rt-id', [{ id: big(400_000), data: 'd' }])],
  ['a 70 KB encoding', message('rt-enc', [{ encoding: big(70_000), data: 'd' }])],
  ['1,001 presence messages in one PRESENCE', presence('rt-pmany', Array.from({ length: 1001 }, () => ({ action: 2 })))],
  ['a 300-byte presence id', presence('rt-pid', [{ action: 2, id: big(300) }])],
  ['70 KB of presence data', presence('rt-pdata', [{ action: 2, data: big(70_000) }])],
  ['70 KB of presence extras', presence('rt-pextras', [{ action: 2, extras: { k: big(70_000) } }])],
];

for (const [name, frame] of NACK_ROWS) {
  test(`realtime row: ${name} → NACK 40009, connection stays`, async () => {
    // Proves the refusal is exact, scoped to the frame, and harms no one else.
    const c = await raw(cat.east, '&clientId=cat');
    c.send(frame);
    const nack = await c.next(ACTION.NACK);
    assert.equal(nack.msgSerial, 0);
    assert.equal(nack.error.code, 40009, JSON.stringify(nack.error));
    // The connection is still usable: the next publish is ACKed.
    c.send({ ...message('rt-after', [{ data: 'fine' }]), msgSerial: 1 });
    assert.equal((await c.next(ACTION.ACK)).msgSerial, 1);
    c.ws.close();
    await cat.stillServes(name);
  });
}

const FATAL_ROWS = [
  ['a frame that is not JSON', '{"action": 15, ', 40000],
  ['a frame with an unknown action', JSON.stringify({ action: 99 }), 80013],
];

for (const [name, text, code] of FATAL_ROWS) {
  test(`realtime row: ${name} → ERROR ${code}, connection closed`, async () => {
    // Proves a broken frame ends only its own connection, with the right code.
    const c = await raw(cat.east);
    c.ws.send(text);
    const error = await c.next(ACTION.ERROR);
    assert.equal(error.error.code, code, JSON.stringify(error.error));
    assert.equal(error.channel, undefined);
    await c.closed;
    await cat.stillServes(name);
  });
}

const INVALID_NAMES = [':hell', '::', '', '[?rewind=1]:x'];

for (const name of INVALID_NAMES) {
  test(`realtime row: ATTACH and MESSAGE on invalid channel name ${JSON.stringify(name)} → 40010, connection stays`, async () => {
    // Proves Ably's channel naming rules: a channel-scoped refusal, never a dead connection.
    const c = await raw(cat.east);
    c.send({ action: ACTION.ATTACH, channel: name });
    const error = await c.next(ACTION.ERROR);
    assert.equal(error.channel, name);
    assert.equal(error.error.code, 40010, JSON.stringify(error.error));
    c.send(message(name, [{ data: 'd' }]));
    assert.equal((await c.next(ACTION.NACK)).error.code, 40010);
    c.send({ ...message('rt-after', [{ data: 'fine' }]), msgSerial: 1 });
    assert.equal((await c.next(ACTION.ACK)).msgSerial, 1);
    c.ws.close();
    await cat.stillServes(`invalid name ${name}`);
  });
}
