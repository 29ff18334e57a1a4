// Push admin through ably-js (RSH1): device registrations and channel subscriptions are
// stored (and survive a restart), listed and removed; push publish reaches a device
// registered with Ably's test transport (`ablyChannel`) as an `__ably_push__` message,
// by deviceId, by clientId and through channel subscriptions of a published message's
// `extras.push`; capabilities (push-admin, push-subscribe, device credentials) are
// enforced with 40160; bounds answer 40000. In a cluster the registry is the same from
// every node of every region.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { LIMITED_KEY, ROOT_KEY, connected, options, startTern, testConfig, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';
import { sample, scrape } from '../lib/metrics.mjs';

const SUBSCRIBER_KEY = 'test.subscriber:subscribersecret';

/// The test config plus a key that may only push-subscribe on `pushenabled:*`, and
/// `push` bounds (TOML lines).
function pushConfig({ push = '', history = '' } = {}) {
  return `${testConfig({ history })}
[[apps.keys]]
id = "subscriber"
secret = "subscribersecret"
capability = '{"pushenabled:*":["push-subscribe","subscribe"]}'
${push ? `\n[push]\n${push}\n` : ''}`;
}

function ablyChannelDevice(id, clientId, channel, key = ROOT_KEY) {
  return {
    id,
    clientId,
    platform: 'browser',
    formFactor: 'desktop',
    deviceSecret: `secret-${id}`,
    push: { recipient: { transportType: 'ablyChannel', channel, ablyKey: key, ablyUrl: 'http://unused' } },
  };
}

/// Collects the `__ably_push__` payloads arriving on `channel` (parsed JSON).
async function pushInbox(realtime, channel) {
  const received = [];
  await realtime.channels.get(channel).subscribe('__ably_push__', (msg) => received.push(JSON.parse(msg.data)));
  return received;
}

async function refusal(promise) {
  try {
    await promise;
  } catch (err) {
    return { code: err.code, statusCode: err.statusCode };
  }
  assert.fail('expected a refusal');
}

test('register, subscribe by deviceId and clientId, push publish, list and remove', async () => {
  // Proves the admin round trip and each delivery path, each notification exactly once.
  const tern = await startTern(pushConfig());
  const realtime = new Ably.Realtime(options(tern.port));
  try {
    const rest = new Ably.Rest(options(tern.port));
    const admin = rest.push.admin;
    await connected(realtime);
    const inbox = await pushInbox(realtime, 'inbox:d1');
    const saved = await admin.deviceRegistrations.save(ablyChannelDevice('d1', 'alice', 'inbox:d1'));
    assert.equal(saved.push.state, 'ACTIVE');
    assert.ok(saved.deviceIdentityToken.token);
    const fcm = { ...ablyChannelDevice('d2', 'alice', 'x'), platform: 'android', formFactor: 'phone' };
    fcm.push = { recipient: { transportType: 'fcm', registrationToken: 'offline' } };
    await admin.deviceRegistrations.save(fcm);
    await admin.channelSubscriptions.save({ channel: 'news', deviceId: 'd1' });
    await admin.channelSubscriptions.save({ channel: 'alerts', clientId: 'alice' });

    const got = await admin.deviceRegistrations.get('d1');
    assert.equal(got.clientId, 'alice');
    assert.equal(got.push.recipient.channel, 'inbox:d1');
    const all = await admin.deviceRegistrations.list({ clientId: 'alice' });
    assert.deepEqual(all.items.map((d) => d.id).sort(), ['d1', 'd2']);
    const onNews = await admin.channelSubscriptions.list({ channel: 'news' });
    assert.deepEqual(onNews.items.map((s) => [s.channel, s.deviceId]), [['news', 'd1']]);
    assert.deepEqual((await admin.channelSubscriptions.listChannels()).items.sort(), ['alerts', 'news']);

    await admin.publish({ deviceId: 'd1' }, { notification: { title: 'one' }, data: { n: 1 } });
    await rest.channels.get('news').publish({ name: 'm', data: 'x', extras: { push: { notification: { title: 'two' } } } });
    await realtime.channels.get('alerts').publish({ name: 'm', data: 'y', extras: { push: { notification: { title: 'three' } } } });
    await admin.publish({ clientId: 'alice' }, { notification: { title: 'four' } });
    // A channel nobody subscribed: nothing; then a marker, so the count below is final.
    await rest.channels.get('quiet').publish({ name: 'm', data: 'z', extras: { push: { notification: { title: 'no' } } } });
    await admin.publish({ deviceId: 'd1' }, { notification: { title: 'end' } });
    await waitUntil(() => inbox.some((p) => p.notification.title === 'end'), 10000, 'the marker');
    assert.deepEqual(inbox.map((p) => p.notification.title), ['one', 'two', 'three', 'four', 'end']);
    assert.deepEqual(inbox[0].data, { n: 1 });

    await admin.channelSubscriptions.remove({ channel: 'alerts', clientId: 'alice' });
    assert.deepEqual((await admin.channelSubscriptions.listChannels()).items, ['news']);
    await admin.deviceRegistrations.remove('d1');
    assert.equal((await refusal(admin.deviceRegistrations.get('d1'))).statusCode, 404);
    // Removing the device removed its subscription.
    assert.deepEqual((await admin.channelSubscriptions.list({})).items, []);
    await admin.deviceRegistrations.removeWhere({ clientId: 'alice' });
    assert.deepEqual((await admin.deviceRegistrations.list({})).items, []);
  } finally {
    realtime.close();
    await tern.stop();
  }
});

test('capabilities: push-admin, push-subscribe on the channel, and device credentials', async () => {
  // Proves each refusal is 40160 and what a push-subscribe client may do for its device.
  const tern = await startTern(pushConfig());
  try {
    const limited = new Ably.Rest(options(tern.port, { key: LIMITED_KEY }));
    for (const call of [
      () => limited.push.admin.deviceRegistrations.list({}),
      () => limited.push.admin.deviceRegistrations.save(ablyChannelDevice('l1', undefined, 'allowed:x')),
      () => limited.push.admin.channelSubscriptions.save({ channel: 'allowed:x', clientId: 'c' }),
      () => limited.push.admin.channelSubscriptions.listChannels(),
      () => limited.push.admin.publish({ clientId: 'c' }, { notification: { title: 't' } }),
    ]) {
      assert.deepEqual(await refusal(call()), { code: 40160, statusCode: 401 });
    }

    const bob = new Ably.Rest(options(tern.port, { key: SUBSCRIBER_KEY, clientId: 'bob' }));
    const device = ablyChannelDevice('bob-phone', 'bob', 'pushenabled:inbox', SUBSCRIBER_KEY);
    const registered = await bob.request('post', '/push/deviceRegistrations', 3, {}, device);
    assert.equal(registered.statusCode, 201);
    const token = registered.items[0].deviceIdentityToken.token;
    // Someone else's clientId: refused.
    const other = await bob.request('post', '/push/deviceRegistrations', 3, {}, { ...device, id: 'x', clientId: 'eve' });
    assert.equal(other.errorCode, 40012);

    const asDevice = { 'X-Ably-DeviceToken': token };
    const subscribe = (channel, headers) =>
      bob.request('post', '/push/channelSubscriptions', 3, {}, { channel, deviceId: 'bob-phone' }, headers);
    assert.equal((await subscribe('pushenabled:a', {})).errorCode, 40160);
    assert.equal((await subscribe('pushenabled:a', { 'X-Ably-DeviceToken': 'tern-device:test:wrong' })).errorCode, 40160);
    assert.equal((await subscribe('elsewhere', asDevice)).errorCode, 40160);
    assert.equal((await subscribe('pushenabled:a', asDevice)).statusCode, 201);
    const byClient = await bob.request('post', '/push/channelSubscriptions', 3, {}, { channel: 'pushenabled:b', clientId: 'bob' });
    assert.equal(byClient.statusCode, 201);
    const forEve = await bob.request('post', '/push/channelSubscriptions', 3, {}, { channel: 'pushenabled:b', clientId: 'eve' });
    assert.equal(forEve.errorCode, 40160);
    const mine = await bob.request('get', '/push/channelSubscriptions', 3, { deviceId: 'bob-phone' }, null, asDevice);
    assert.deepEqual(mine.items, [{ channel: 'pushenabled:a', deviceId: 'bob-phone' }]);
    assert.equal((await bob.request('get', '/push/deviceRegistrations', 3, {}, null)).errorCode, 40160);
    assert.equal((await bob.request('get', '/push/deviceRegistrations/bob-phone', 3, {}, null)).errorCode, 40160);
    assert.equal((await bob.request('get', '/push/deviceRegistrations/bob-phone', 3, {}, null, asDevice)).statusCode, 200);

    // The device alone (its token as bearer, as ably-js updates and deregisters).
    const bearer = { authorization: `Bearer ${Buffer.from(token).toString('base64')}`, 'content-type': 'application/json' };
    const base = `http://127.0.0.1:${tern.port}/push/deviceRegistrations`;
    const patched = await fetch(`${base}/bob-phone`, {
      method: 'PATCH', headers: bearer,
      body: JSON.stringify({ push: { recipient: { transportType: 'ablyChannel', channel: 'pushenabled:new', ablyKey: SUBSCRIBER_KEY } } }),
    });
    assert.equal(patched.status, 200);
    assert.equal((await patched.json()).push.recipient.channel, 'pushenabled:new');
    const wrongBearer = { authorization: `Bearer ${Buffer.from('tern-device:test:nope').toString('base64')}` };
    assert.equal((await (await fetch(`${base}?deviceId=bob-phone`, { method: 'DELETE', headers: wrongBearer })).json()).error.code, 40160);
    // A device token naming an app this node does not have is no credential at all.
    const forged = { authorization: `Bearer ${Buffer.from('tern-device:no-such-app:x').toString('base64')}` };
    const unknownApp = await fetch(`${base}/bob-phone`, { headers: forged });
    assert.equal(unknownApp.status, 401);
    assert.equal((await unknownApp.json()).error.code, 40101);
    assert.equal((await fetch(`${base}?deviceId=bob-phone`, { method: 'DELETE', headers: bearer })).status, 204);
    const root = new Ably.Rest(options(tern.port));
    assert.deepEqual((await root.push.admin.deviceRegistrations.list({})).items, []);
  } finally {
    await tern.stop();
  }
});

test('bounds and bad input get 40000, and the registry keeps serving', async () => {
  // Proves the configured count and byte limits and shape checks, never a crash.
  const tern = await startTern(pushConfig({ push: 'devices_max = 2\nsubscriptions_max = 1\nrecipient_bytes_max = 200' }));
  try {
    const rest = new Ably.Rest(options(tern.port));
    const admin = rest.push.admin;
    await admin.deviceRegistrations.save(ablyChannelDevice('a', 'c', 'x'));
    await admin.deviceRegistrations.save(ablyChannelDevice('b', 'c', 'x'));
    assert.deepEqual(await refusal(admin.deviceRegistrations.save(ablyChannelDevice('c', 'c', 'x'))), { code: 40000, statusCode: 400 });
    // Replacing an existing device is not a new one.
    await admin.deviceRegistrations.save(ablyChannelDevice('b', 'd', 'x'));
    await admin.channelSubscriptions.save({ channel: 'one', clientId: 'c' });
    assert.equal((await refusal(admin.channelSubscriptions.save({ channel: 'two', clientId: 'c' }))).code, 40000);
    const big = ablyChannelDevice('a', 'c', 'x'.repeat(300));
    assert.equal((await refusal(admin.deviceRegistrations.save(big))).code, 40000);
    const badPlatform = { ...ablyChannelDevice('a', 'c', 'x'), platform: 'toaster' };
    assert.equal((await refusal(admin.deviceRegistrations.save(badPlatform))).code, 40000);
    const badTransport = { ...ablyChannelDevice('a', 'c', 'x'), push: { recipient: { transportType: 'pigeon' } } };
    assert.equal((await refusal(admin.deviceRegistrations.save(badTransport))).code, 40000);
    const both = await rest.request('post', '/push/channelSubscriptions', 3, {}, { channel: 'x', clientId: 'c', deviceId: 'a' });
    assert.equal(both.errorCode, 40000);
    const raw = await fetch(`http://127.0.0.1:${tern.port}/push/deviceRegistrations`, {
      method: 'POST',
      headers: { authorization: `Basic ${Buffer.from(ROOT_KEY).toString('base64')}`, 'content-type': 'application/json' },
      body: '{"id": [',
    });
    assert.equal(raw.status, 400);
    assert.equal((await raw.json()).error.code, 40000);
    const ids = (await admin.deviceRegistrations.list({})).items.map((d) => [d.id, d.clientId]);
    assert.deepEqual(ids, [['a', 'c'], ['b', 'd']]);
    // The internal push log is no channel a client can read or attach.
    const log = await rest.request('get', '/channels/' + encodeURIComponent('[tern]push') + '/messages', 3, {}, null);
    assert.equal(log.errorCode, 40010);
  } finally {
    await tern.stop();
  }
});

test('one publish delivers at most deliveries_per_publish_max notifications', async () => {
  // Proves the bound on payloads x devices: a fan-out past it stops there.
  const tern = await startTern(pushConfig({ push: 'deliveries_per_publish_max = 2' }));
  const realtime = new Ably.Realtime(options(tern.port));
  try {
    const rest = new Ably.Rest(options(tern.port));
    await connected(realtime);
    const inbox = await pushInbox(realtime, 'inbox:many');
    for (const id of ['m1', 'm2', 'm3']) {
      await rest.push.admin.deviceRegistrations.save(ablyChannelDevice(id, 'many', 'inbox:many'));
    }
    await rest.push.admin.channelSubscriptions.save({ channel: 'fan', clientId: 'many' });
    await rest.channels.get('fan').publish({ name: 'm', data: 'x', extras: { push: { notification: { title: 'fan' } } } });
    await rest.push.admin.publish({ deviceId: 'm1' }, { notification: { title: 'end' } });
    await waitUntil(() => inbox.some((p) => p.notification.title === 'end'), 10000, 'the marker');
    assert.deepEqual(inbox.map((p) => p.notification.title), ['fan', 'fan', 'end']);
  } finally {
    realtime.close();
    await tern.stop();
  }
});

test('registrations and subscriptions survive a SIGKILL restart', async () => {
  // Proves the push log is stored before a write is answered and folded again at boot.
  const config = pushConfig({ history: 'mode = "redb"\npath = "data/history.redb"' });
  const first = await startTern(config);
  try {
    const admin = new Ably.Rest(options(first.port)).push.admin;
    for (let i = 0; i < 5; i++) await admin.deviceRegistrations.save(ablyChannelDevice(`r${i}`, 'c', 'x'));
    await admin.deviceRegistrations.remove('r0');
    await admin.channelSubscriptions.save({ channel: 'kept', deviceId: 'r1' });
  } finally {
    await first.stop('SIGKILL');
  }
  const second = await startTern(config, { dir: first.dir });
  try {
    const admin = new Ably.Rest(options(second.port)).push.admin;
    const ids = (await admin.deviceRegistrations.list({})).items.map((d) => d.id);
    assert.deepEqual(ids, ['r1', 'r2', 'r3', 'r4']);
    const subs = (await admin.channelSubscriptions.list({})).items;
    assert.deepEqual(subs.map((s) => [s.channel, s.deviceId]), [['kept', 'r1']]);
  } finally {
    await second.stop();
  }
});

test('in a cluster the registry is the same from every node of every region, and delivery works from any node', async () => {
  // Proves push writes replicate like messages and reads go to each region's push home.
  const cluster = await startRegions({ nodesPerRegion: 2 });
  const clients = [];
  try {
    const hosts = cluster.nodes.map((n) => n.host);
    const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
    for (const host of hosts) {
      await waitUntil(async () => {
        const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
        return body.regions.reduce((sum, r) => sum + r.nodes.length, 0) === 6;
      }, 20000, `membership on ${host}`);
    }
    await rest(hosts[0]).push.admin.deviceRegistrations.save(ablyChannelDevice('c1', 'carol', 'inbox:c1', DEV_KEY));
    await rest(hosts[4]).push.admin.channelSubscriptions.save({ channel: 'cluster-news', clientId: 'carol' });
    for (const host of hosts) {
      await waitUntil(async () => {
        const admin = rest(host).push.admin;
        const devices = (await admin.deviceRegistrations.list({})).items.map((d) => d.id);
        const subs = (await admin.channelSubscriptions.list({ channel: 'cluster-news' })).items.map((s) => s.clientId);
        return devices.join() === 'c1' && subs.join() === 'carol';
      }, 15000, `the registry on ${host}`);
    }
    // A subscriber on one node; a message with extras.push published on each other node.
    const realtime = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: hosts[1] }));
    clients.push(realtime);
    await connected(realtime);
    const inbox = await pushInbox(realtime, 'inbox:c1');
    for (const [i, host] of hosts.entries()) {
      const extras = { push: { notification: { title: `from-${i}` } } };
      await rest(host).channels.get('cluster-news').publish({ name: 'n', data: 'x', extras });
    }
    await waitUntil(() => inbox.length >= hosts.length, 15000, 'a notification from every node');
    assert.deepEqual(inbox.map((p) => p.notification.title).sort(), hosts.map((_, i) => `from-${i}`).sort());
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});

test('when a region\'s push home dies, the next node of the region serves the same registry', async () => {
  // Proves the new home finds the log (copied from another region) and folds it.
  const cluster = await startRegions({ nodesPerRegion: 2 });
  try {
    const rest = (host) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host }));
    for (const node of cluster.nodes) {
      await waitUntil(async () => {
        const body = await (await fetch(`http://${node.host}:${cluster.adminPort}/regions`)).json();
        return body.regions.reduce((sum, r) => sum + r.nodes.length, 0) === 6;
      }, 20000, `membership on ${node.host}`);
    }
    const usEast = cluster.nodes.filter((n) => n.region.name === 'us-east');
    const admin = rest(usEast[0].host).push.admin;
    for (const id of ['f1', 'f2', 'f3']) await admin.deviceRegistrations.save(ablyChannelDevice(id, 'dave', 'x', DEV_KEY));
    await admin.channelSubscriptions.save({ channel: 'failover', deviceId: 'f2' });
    // The region's push home is the node that journaled the writes.
    const writes = async (node) => {
      return sample(await scrape(node.host, cluster.adminPort), 'tern_push_mutations_total') ?? 0;
    };
    const counts = await Promise.all(usEast.map(writes));
    assert.deepEqual(counts.slice().sort(), [0, 4], `push writes per us-east node: ${counts}`);
    const home = usEast[counts.indexOf(4)];
    const survivor = usEast[counts.indexOf(0)];
    await home.stop('SIGKILL');
    const view = async () => {
      try {
        const a = rest(survivor.host).push.admin;
        const devices = (await a.deviceRegistrations.list({})).items.map((d) => d.id).sort().join();
        const subs = (await a.channelSubscriptions.list({})).items.map((s) => `${s.channel}/${s.deviceId}`).join();
        return `${devices} ${subs}`;
      } catch {
        return 'unavailable';
      }
    };
    await waitUntil(async () => (await view()) === 'f1,f2,f3 failover/f2', 30000, 'the registry on the surviving us-east node');
    // And it takes writes that reach the other regions.
    await rest(survivor.host).push.admin.deviceRegistrations.remove('f1');
    await waitUntil(async () => {
      const items = (await rest(cluster.nodes[1].host).push.admin.deviceRegistrations.list({})).items;
      return items.map((d) => d.id).sort().join() === 'f2,f3';
    }, 15000, 'the removal in eu-west');
  } finally {
    await cluster.stop();
  }
});
