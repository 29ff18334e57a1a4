// Derived channels with ably-js (`channels.getDerived(name, { filter })`): only the
// messages the filter selects arrive, with their own ids, beside a plain attachment of
// the same channel on the same connection; the derived channel is read-only; a bad
// filter is refused with 40010; filtering works on a channel published in another region.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { REGIONS, startRegions } from '../lib/regions.mjs';

const batch = [
  { name: 'order', data: 'a', extras: { headers: { region: 'eu', cost: 10 } } },
  { name: 'order', data: 'b', extras: { headers: { region: 'us', cost: 50 } } },
  { name: 'order', data: 'c' },
  { name: 'refund', data: 'd', extras: { headers: { region: 'eu', cost: 99 } } },
  { name: 'order', data: 'e', extras: { headers: { region: 'eu', cost: 70 } } },
];
const FILTER = "name == 'order' && headers.region == `\"eu\"` && (headers.cost < `20` || headers.cost >= `70`)";

test('a derived channel receives only the selected messages, beside a plain attachment', async () => {
  /// Proves server-side filtering of a multi-message publish (ids stay those of the
  /// unfiltered messages), two attachments of one channel on one connection, and
  /// echo=false honoured on the derived one.
  const tern = await startTern(testConfig());
  const client = new Ably.Realtime(options(tern.port, { echoMessages: false }));
  const publisher = new Ably.Realtime(options(tern.port));
  try {
    await Promise.all([connected(client), connected(publisher)]);
    const derived = client.channels.getDerived('shop', { filter: FILTER });
    const plain = client.channels.get('shop');
    const filtered = [];
    const all = [];
    await derived.subscribe((m) => filtered.push(m));
    await plain.subscribe((m) => all.push(m));
    // The subscriber's own publish (echo off) reaches neither attachment.
    await plain.publish({ name: 'order', data: 'own', extras: { headers: { region: 'eu', cost: 1 } } });
    await publisher.channels.get('shop').publish(batch);
    await waitUntil(() => all.length === 5 && filtered.length === 2, 10000, 'deliveries');
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(filtered.map((m) => m.data), ['a', 'e']);
    assert.deepEqual(all.map((m) => m.data), ['a', 'b', 'c', 'd', 'e']);
    assert.deepEqual(filtered.map((m) => m.id), [all[0].id, all[4].id]);
    assert.equal(filtered[1].extras.headers.cost, 70);

    // Detaching the derived channel leaves the plain one attached.
    await derived.detach();
    await publisher.channels.get('shop').publish(batch[0]);
    await waitUntil(() => all.length === 6, 10000, 'plain delivery after derived detach');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(filtered.length, 2);
  } finally {
    client.close();
    publisher.close();
    await tern.stop();
  }
});

test('a derived channel is read-only and a bad filter is refused', async () => {
  /// Proves publish and presence on a derived channel are refused (realtime and REST)
  /// without publishing on the channel, and an unparsable filter fails the attach (40010).
  const tern = await startTern(testConfig());
  const client = new Ably.Realtime(options(tern.port, { clientId: 'ro' }));
  try {
    await connected(client);
    const derived = client.channels.getDerived('ro', { filter: "name == 'x'" });
    await derived.attach();
    await assert.rejects(derived.publish('x', 'nope'), (err) => err.code === 40000);
    await assert.rejects(derived.presence.enter('nope'), (err) => err.code === 40000);
    const rest = new Ably.Rest(options(tern.port));
    await assert.rejects(rest.channels.get(derived.name).publish('x', 'nope'), (err) => err.code === 40000);
    const history = await rest.channels.get('ro').history();
    assert.equal(history.items.length, 0);

    const bad = client.channels.getDerived('ro', { filter: 'headers.a ==' });
    await assert.rejects(bad.attach(), (err) => err.code === 40010);
    const unknown = client.channels.getDerived('ro', { filter: 'data == `1`' });
    await assert.rejects(unknown.attach(), (err) => err.code === 40010);
  } finally {
    client.close();
    await tern.stop();
  }
});

test('a derived channel filters messages published in another region', async () => {
  /// Proves filtering applies to replicated events: subscriber in eu-west, publisher
  /// in us-east.
  const regions = await startRegions();
  const at = (r) => ({ ...options(regions.port, { key: 'dev.root:dev-secret-change-me' }), endpoint: REGIONS[r].host });
  const subscriber = new Ably.Realtime(at(1));
  const publisher = new Ably.Rest(at(0));
  try {
    await connected(subscriber);
    const filtered = [];
    await subscriber.channels.getDerived('far', { filter: FILTER }).subscribe((m) => filtered.push(m.data));
    await publisher.channels.get('far').publish(batch);
    await waitUntil(() => filtered.length === 2, 15000, 'filtered deliveries');
    assert.deepEqual(filtered, ['a', 'e']);
  } finally {
    subscriber.close();
    await regions.stop();
  }
});

test('re-auth without subscribe on the channel fails its derived attachment (40160)', async () => {
  /// Proves a derived attachment is held to the connection's new capability after
  /// in-band re-auth, as a plain one is: channel ERROR 40160, no more deliveries.
  const tern = await startTern(testConfig());
  const rest = new Ably.Rest(options(tern.port));
  let capability = { 'reauth-derived': ['subscribe'], other: ['subscribe'] };
  const client = new Ably.Realtime(options(tern.port, {
    key: undefined,
    authCallback: (_params, callback) => {
      rest.auth.createTokenRequest({ capability }).then((tr) => callback(null, tr), (e) => callback(e, null));
    },
  }));
  try {
    await connected(client);
    const derived = client.channels.getDerived('reauth-derived', { filter: "name == 'x'" });
    const got = [];
    await derived.subscribe((m) => got.push(m.data));
    await rest.channels.get('reauth-derived').publish('x', 'before');
    await waitUntil(() => got.length === 1, 10000, 'delivery before re-auth');
    capability = { other: ['subscribe'] };
    await client.auth.authorize();
    await waitUntil(() => derived.state === 'failed', 10000, 'derived channel to fail');
    assert.equal(derived.errorReason.code, 40160);
    await rest.channels.get('reauth-derived').publish('x', 'after');
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(got, ['before']);
    assert.equal(client.connection.state, 'connected');
  } finally {
    client.close();
    await tern.stop();
  }
});
