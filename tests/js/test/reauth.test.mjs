// ably-js in-band re-auth against tern: a token with a narrower capability takes
// effect on what the connection already has (RTC8a1).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();

test('authorize() with a narrower token fails the channel it lost (40160); the rest keeps working', async () => {
  // Proves session.rs reauthorize: channel ERROR 40160 for a channel the new
  // capability no longer covers, no more of its messages, the connection stays up.
  const rest = new Ably.Rest(options(suite.port));
  let capability = { 'reauth-lost': ['subscribe'], 'reauth-kept': ['subscribe'] };
  const client = suite.realtime({
    key: undefined,
    authCallback: (_params, callback) => {
      rest.auth.createTokenRequest({ capability }).then((tr) => callback(null, tr), (e) => callback(e, null));
    },
  });
  await connected(client);
  const states = [];
  client.connection.on((change) => states.push(change.current));
  const lost = client.channels.get('reauth-lost');
  const kept = client.channels.get('reauth-kept');
  const got = { lost: [], kept: [] };
  await lost.subscribe((m) => got.lost.push(m.data));
  await kept.subscribe((m) => got.kept.push(m.data));

  const publisher = await connected(suite.realtime());
  await publisher.channels.get('reauth-lost').publish('m', 'before');
  await waitUntil(() => got.lost.length === 1, 10000, 'message before re-auth');

  capability = { 'reauth-kept': ['subscribe'] };
  await client.auth.authorize();
  await waitUntil(() => lost.state === 'failed', 10000, 'lost channel to fail');
  assert.equal(lost.errorReason.code, 40160);
  assert.equal(kept.state, 'attached');

  await publisher.channels.get('reauth-lost').publish('m', 'after');
  await publisher.channels.get('reauth-kept').publish('m', 'kept-after');
  await waitUntil(() => got.kept.length === 1, 10000, 'message on the kept channel');
  assert.deepEqual(got.lost, ['before']);
  assert.deepEqual(got.kept, ['kept-after']);
  await assert.rejects(lost.attach(), (err) => err.code === 40160);
  assert.equal(client.connection.state, 'connected');
  assert.ok(states.every((state) => state === 'connected'), `connection states: ${states}`);
});
