// Token requests through ably-js as Ably answers them: asking for more than the key
// holds gets the intersection, nothing in common is 40160, an invalid capability is
// 40000, and a key's own capability comes back as the key wrote it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { LIMITED_KEY, options, ternSuite } from '../lib/tern.mjs';

const suite = ternSuite();

test('requestToken gets the intersection of what it asks and what the key holds', async () => {
  // Proves RSA6-style narrowing instead of a refusal, and the refusals that remain.
  const rest = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  const narrowed = await rest.auth.requestToken({ capability: { '*': ['subscribe', 'publish'] } });
  assert.deepEqual(JSON.parse(narrowed.capability), {
    'allowed:*': ['publish', 'subscribe'],
    'readonly:*': ['subscribe'],
  });
  const own = await rest.auth.requestToken();
  assert.deepEqual(JSON.parse(own.capability), {
    'allowed:*': ['publish', 'subscribe', 'presence', 'history'],
    'readonly:*': ['subscribe'],
  }, 'the key capability as configured, operations in its order');
  await assert.rejects(rest.auth.requestToken({ capability: { 'elsewhere': ['publish'] } }), (e) => e.code === 40160);
  await assert.rejects(rest.auth.requestToken({ capability: { 'allowed:x': ['*', 'publish'] } }), (e) => e.code === 40000);
  await assert.rejects(rest.auth.requestToken({ capability: { 'allowed:x': [] } }), (e) => e.code === 40000);
  // The narrowed token works for what it holds and nothing else.
  const client = new Ably.Rest(options(suite.port, { key: undefined, token: narrowed.token }));
  await client.channels.get('allowed:t').publish('n', 'd');
  await assert.rejects(client.channels.get('readonly:t').publish('n', 'd'), (e) => e.code === 40160);
});
