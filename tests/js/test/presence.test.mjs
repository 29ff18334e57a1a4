// ably-js presence against tern: enter/update/leave, multi-page SYNC, leave on close.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connected, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();
const realtime = (extra, port) => suite.realtime(extra, port);

test('enter, update and leave are seen by another client and by presence.get()', async () => {
  // Proves PRESENCE broadcast with ids ably-js accepts, and the member set.
  const alice = await connected(realtime({ clientId: 'alice' }));
  const bob = await connected(realtime({ clientId: 'bob' }));
  const watched = bob.channels.get('room');
  const events = [];
  await watched.presence.subscribe((m) => events.push([m.action, m.clientId, m.data]));
  const mine = alice.channels.get('room');
  await mine.presence.enter('hello');
  await waitUntil(() => events.length === 1, 10000, 'enter');
  assert.deepEqual(events[0], ['enter', 'alice', 'hello']);
  assert.deepEqual((await watched.presence.get()).map((m) => [m.clientId, m.data]), [['alice', 'hello']]);
  await mine.presence.update('busy');
  await waitUntil(() => events.length === 2, 10000, 'update');
  assert.deepEqual(events[1], ['update', 'alice', 'busy']);
  assert.deepEqual((await watched.presence.get()).map((m) => m.data), ['busy']);
  await mine.presence.leave();
  await waitUntil(() => events.length === 3, 10000, 'leave');
  assert.equal(events[2][0], 'leave');
  assert.deepEqual(await watched.presence.get(), []);
});

test('presence.get() on a fresh client returns every member across several SYNC pages', async () => {
  // Proves HAS_PRESENCE + multi-page SYNC (the test config pages 10 members at a time).
  const owner = await connected(realtime());
  const channel = owner.channels.get('crowd');
  for (let i = 0; i < 35; i++) await channel.presence.enterClient(`member-${i}`, { i });
  const late = await connected(realtime());
  const members = await late.channels.get('crowd').presence.get();
  assert.equal(members.length, 35);
  assert.deepEqual(new Set(members.map((m) => m.clientId)), new Set(Array.from({ length: 35 }, (_, i) => `member-${i}`)));
});

test('a client that closes leaves presence for everyone else', async () => {
  // Proves LEAVE on CLOSE.
  const leaver = await connected(realtime({ clientId: 'leaver' }));
  const watcher = await connected(realtime({ clientId: 'watcher' }));
  const events = [];
  await watcher.channels.get('bye').presence.subscribe((m) => events.push([m.action, m.clientId]));
  await leaver.channels.get('bye').presence.enter();
  await waitUntil(() => events.length === 1, 10000, 'enter');
  leaver.close();
  await waitUntil(() => events.some(([a]) => a === 'leave'), 10000, 'leave after close');
  assert.deepEqual(await watcher.channels.get('bye').presence.get(), []);
});
