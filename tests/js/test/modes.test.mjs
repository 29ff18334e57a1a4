// Channel modes and params on ATTACH, through ably-js: what a client asks for is what
// it gets (`channel.modes`, `channel.params`), and the server holds the attachment to
// it: no messages without subscribe, no presence events without presence_subscribe, no
// publish or presence enter without those modes (40165).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connected, ternSuite, waitUntil } from '../lib/tern.mjs';

const suite = ternSuite();
const realtime = (extra) => suite.realtime(extra);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function code(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code;
  }
  return 'no error';
}

test('a channel attached with params.modes=subscribe only subscribes; known params are echoed', async () => {
  // Proves params.modes narrows the attachment and ATTACHED echoes the params it knows.
  const client = await connected(realtime({ clientId: 'sub-only' }));
  const other = await connected(realtime({ clientId: 'other' }));
  const channel = client.channels.get('modes-sub', { params: { modes: 'subscribe', delta: 'vcdiff', nonexistent: 'x' } });
  await channel.attach();
  assert.deepEqual(channel.modes, ['subscribe']);
  assert.deepEqual(channel.params, { modes: 'subscribe', delta: 'vcdiff' });
  const got = [];
  const presence = [];
  await channel.subscribe((m) => got.push(m.data));
  channel.presence.subscriptions.on((p) => presence.push(p.clientId));
  const peer = other.channels.get('modes-sub');
  await peer.publish('n', 'hello');
  await peer.presence.enter();
  await waitUntil(() => got.includes('hello'), 5000, 'message delivered');
  assert.equal(await code(channel.publish('n', 'nope')), 40165);
  assert.equal(await code(channel.presence.enter()), 40165);
  await sleep(300);
  assert.deepEqual(presence, [], 'no presence events without presence_subscribe');
});

test('modes publish + presence_subscribe: publishes and sees presence, receives no messages', async () => {
  // Proves the ATTACH mode flags decide deliveries and operations, as ably-js reports them.
  const client = await connected(realtime({ clientId: 'pub' }));
  const other = await connected(realtime({ clientId: 'watched' }));
  const channel = client.channels.get('modes-pub', { modes: ['publish', 'presence_subscribe'] });
  await channel.attach();
  assert.deepEqual(channel.modes, ['publish', 'presence_subscribe']);
  const got = [];
  const entered = [];
  await channel.subscribe((m) => got.push(m.data));
  channel.presence.subscriptions.on('enter', (p) => entered.push(p.clientId));
  const peer = other.channels.get('modes-pub');
  const peerGot = [];
  await peer.subscribe((m) => peerGot.push(m.data));
  await channel.publish('n', 'from-pub');
  await waitUntil(() => peerGot.includes('from-pub'), 5000, 'publish reached the peer');
  await peer.presence.enter();
  await waitUntil(() => entered.includes('watched'), 5000, 'presence event delivered');
  assert.equal(await code(channel.presence.enter()), 40165);
  await peer.publish('n', 'not-for-you');
  await sleep(300);
  assert.deepEqual(got, [], 'no messages without subscribe');
});

test('an attach asking for no modes gets every mode the key grants', async () => {
  // Proves the default grant ably-js expects (annotation_publish included).
  const client = await connected(realtime());
  const channel = client.channels.get('modes-default');
  await channel.attach();
  assert.deepEqual(channel.modes, ['presence', 'publish', 'subscribe', 'presence_subscribe', 'annotation_publish']);
  assert.deepEqual(channel.params, {});
});
