// App statistics through ably-js: `rest.stats()` reports what tern counted (messages in
// and out, connections, channels, API and token requests), fixtures posted the way
// Ably's sandbox takes them read back per minute, hour and month and page by page in
// both directions and both formats, and in a cluster any node answers with the sum of
// every node's counts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, LIMITED_KEY, options, ROOT_KEY, startTern, ternSuite, testConfig, waitUntil } from '../lib/tern.mjs';
import { DEV_KEY, startRegions } from '../lib/regions.mjs';

const FIXTURES_ON = '\n[stats]\nfixtures = true\n';
const suite = ternSuite(testConfig() + FIXTURES_ON);

/// Sums every entry over `items` (peaks: the largest).
function totals(items) {
  const sum = {};
  for (const item of items) {
    for (const [name, value] of Object.entries(item.entries)) {
      sum[name] = name.endsWith('.peak') ? Math.max(sum[name] || 0, value) : (sum[name] || 0) + value;
    }
  }
  return sum;
}

/// Every minute of statistics from `start` until now, forwards.
async function minutesSince(rest, start) {
  const page = await rest.stats({ start, end: Date.now(), unit: 'minute', direction: 'forwards', limit: 1000 });
  return page.items;
}

async function postFixtures(host, port, key, fixtures) {
  return fetch(`http://${host}:${port}/stats`, {
    method: 'POST',
    headers: {
      authorization: `Basic ${Buffer.from(key).toString('base64')}`,
      'content-type': 'application/json',
    },
    body: JSON.stringify(fixtures),
  });
}

/// The ably-js suite's fixtures (test/rest/stats.test.js), in UTC: three minutes of
/// last year's 3 February, then two of 3 March.
const lastYear = new Date().getUTCFullYear() - 1;
const FIXTURES = [
  {
    intervalId: `${lastYear}-02-03:15:03`,
    inbound: { realtime: { messages: { count: 50, data: 5000 } } },
    outbound: { realtime: { messages: { count: 20, data: 2000 } } },
  },
  {
    intervalId: `${lastYear}-02-03:15:04`,
    inbound: { realtime: { messages: { count: 60, data: 6000 } } },
    outbound: { realtime: { messages: { count: 10, data: 1000 } } },
  },
  {
    intervalId: `${lastYear}-02-03:15:05`,
    inbound: { realtime: { messages: { count: 70, data: 7000 } } },
    outbound: { realtime: { messages: { count: 40, data: 4000 } } },
    persisted: { presence: { count: 20, data: 2000 } },
    connections: { tls: { peak: 20, opened: 10 } },
    channels: { peak: 50, opened: 30 },
    apiRequests: { succeeded: 50, failed: 10 },
    tokenRequests: { succeeded: 60, failed: 20 },
  },
  ...[7, 8].map((minute) => ({
    intervalId: `${lastYear}-03-03:15:0${minute}`,
    inbound: { realtime: { messages: { count: 15, data: 4000 } } },
    outbound: { realtime: { messages: { count: 33, data: 3000 } } },
  })),
];

test('stats count what tern did: messages in and out, connections, channels, requests', async () => {
  // Proves the live counters: realtime and REST publishes (count and Ably's size),
  // deliveries to a subscriber, connections opened and their peak, channels opened,
  // token requests and refused API requests, summed over the minutes they fell in.
  const start = Date.now();
  const rest = new Ably.Rest(options(suite.port));
  const subscriber = await connected(suite.realtime());
  const publisher = await connected(suite.realtime({ echoMessages: false }));
  const got = [];
  await subscriber.channels.get('stats-live').subscribe((m) => got.push(m.data));
  // Ably's size of each message: name "n" + data "abcd" = 5 bytes.
  for (let i = 0; i < 3; i++) await publisher.channels.get('stats-live').publish('n', 'abcd');
  for (let i = 0; i < 2; i++) await rest.channels.get('stats-live').publish('n', 'abcd');
  await waitUntil(() => got.length === 5, 10000, 'five deliveries');
  await rest.auth.requestToken();
  const limited = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  await assert.rejects(limited.channels.get('stats-live').publish('n', 'x'), (err) => err.code === 40160);

  let sum = {};
  await waitUntil(async () => {
    sum = totals(await minutesSince(rest, start));
    return sum['messages.outbound.realtime.messages.count'] === 5 && sum['channels.opened'] === 1;
  }, 10000, 'outbound and channel counts');
  assert.equal(sum['messages.inbound.realtime.messages.count'], 3);
  assert.equal(sum['messages.inbound.realtime.messages.data'], 15);
  assert.equal(sum['messages.inbound.rest.messages.count'], 2);
  assert.equal(sum['messages.inbound.rest.messages.data'], 10);
  assert.equal(sum['messages.inbound.all.messages.count'], 5);
  assert.equal(sum['messages.outbound.realtime.messages.data'], 25);
  assert.equal(sum['messages.outbound.all.all.count'], 5);
  assert.equal(sum['messages.all.all.count'], 10);
  assert.equal(sum['connections.all.opened'], 2);
  assert.equal(sum['connections.all.peak'], 2);
  assert.equal(sum['apiRequests.tokenRequests.succeeded'], 1);
  assert.equal(sum['apiRequests.other.refused'], 1, 'the limited key’s refused publish');
  assert.ok(sum['apiRequests.other.succeeded'] >= 2, 'the REST publishes (and stats reads)');

  // The current hour is in progress and has every field ably-js reads (TS12).
  const [hour] = (await rest.stats({ end: Date.now(), unit: 'hour' })).items;
  assert.equal(typeof hour.inProgress, 'string');
  assert.match(hour.inProgress, /^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d$/);
  assert.match(hour.intervalId, /^\d{4}-\d\d-\d\d:\d\d$/);
  assert.equal(hour.unit, 'hour');
  assert.equal(hour.appId, 'test');
  assert.match(hour.schema, /^https:\/\/schemas\.ably\.com\/json\/app-stats-/);
  assert.ok(hour.entries['messages.inbound.all.messages.count'] >= 5);
});

test('fixtures read back per minute, hour and month, in both directions, paged, in both formats', async () => {
  // Proves POST /stats fixtures (the ably-js suite's), interval ids and ms as start/end,
  // aggregation, limit and Link paging (next, first, last) forwards and backwards, and
  // msgpack responses.
  const response = await postFixtures('127.0.0.1', suite.port, ROOT_KEY, FIXTURES);
  assert.equal(response.status, 201);
  for (const binary of [false, true]) {
    const rest = new Ably.Rest(options(suite.port, { binary }));
    const inbound = (items) => items.map((s) => s.entries['messages.inbound.all.messages.count']);
    const data = (page) => page.items.map((s) => s.entries['messages.inbound.all.messages.data']);

    let page = await rest.stats({ start: `${lastYear}-02-03:15:03`, end: `${lastYear}-02-03:15:05`, direction: 'forwards' });
    assert.deepEqual(inbound(page.items), [50, 60, 70]);
    assert.deepEqual(page.items.map((s) => s.entries['messages.outbound.all.messages.count']), [20, 10, 40]);
    assert.equal(page.items[0].intervalId, `${lastYear}-02-03:15:03`);
    assert.equal(page.items[0].unit, 'minute');
    assert.equal(page.items[0].inProgress, undefined);

    const start = Date.UTC(lastYear, 1, 3, 15, 3, 0);
    page = await rest.stats({ start, end: Date.UTC(lastYear, 2, 3, 15, 6, 0), direction: 'forwards' });
    assert.deepEqual(inbound(page.items), [50, 60, 70], 'ms bounds; March starts after the end');

    page = await rest.stats({ start: `${lastYear}-02-03:15`, end: `${lastYear}-02-03:18`, direction: 'forwards', by: 'hour' });
    assert.equal(page.items.length, 1);
    assert.equal(page.items[0].intervalId, `${lastYear}-02-03:15`);
    const hour = page.items[0].entries;
    assert.deepEqual([hour['messages.inbound.all.messages.count'], hour['messages.outbound.all.messages.count']], [180, 70]);
    assert.equal(hour['connections.all.peak'], 20);
    assert.equal(hour['apiRequests.all.succeeded'], 110, 'API and token requests');
    assert.equal(hour['messages.persisted.all.count'], 20);

    page = await rest.stats({ start: `${lastYear}-01`, end: `${lastYear}-03`, unit: 'month', direction: 'forwards' });
    assert.deepEqual(page.items.map((s) => s.intervalId), [`${lastYear}-02-01:00`, `${lastYear}-03-01:00`]);
    assert.deepEqual(inbound(page.items), [180, 30]);

    page = await rest.stats({ end: `${lastYear}-02-03:15:04`, direction: 'backwards', limit: 1 });
    assert.deepEqual(inbound(page.items), [60]);
    page = await rest.stats({ end: `${lastYear}-02-03:15:04`, direction: 'forwards', limit: 1 });
    assert.deepEqual(inbound(page.items), [50]);

    for (const [direction, expected] of [['backwards', [7000, 6000, 5000]], ['forwards', [5000, 6000, 7000]], [undefined, [7000, 6000, 5000]]]) {
      const params = { end: `${lastYear}-02-03:15:05`, limit: 1 };
      if (direction) params.direction = direction;
      page = await rest.stats(params);
      const seen = [data(page)];
      while (page.hasNext()) {
        page = await page.next();
        seen.push(data(page));
      }
      assert.deepEqual(seen, expected.map((d) => [d]), `${direction} paging`);
      assert.ok(page.isLast());
      assert.deepEqual(data(await page.first()), [expected[0]]);
    }
  }
});

test('stats need the stats operation; fixtures need a full key; bad params are refused', async () => {
  // Proves the capability checks (40160) and parameter validation (40003).
  const limited = new Ably.Rest(options(suite.port, { key: LIMITED_KEY }));
  await assert.rejects(limited.stats({}), (err) => err.code === 40160 && err.statusCode === 401);
  const refused = await postFixtures('127.0.0.1', suite.port, LIMITED_KEY, FIXTURES);
  assert.equal((await refused.json()).error.code, 40160);
  const rest = new Ably.Rest(options(suite.port));
  for (const params of [{ unit: 'week' }, { limit: 1001 }, { start: 'yesterday' }, { start: 10, end: 5 }, { direction: 'up' }]) {
    await assert.rejects(rest.stats(params), (err) => err.code === 40003, JSON.stringify(params));
  }
  const bad = await postFixtures('127.0.0.1', suite.port, ROOT_KEY, [{ intervalId: `${lastYear}-02-03:15` }]);
  assert.equal(bad.status, 400);
});

test('without [stats] fixtures = true, POST /stats does not exist', async () => {
  // Proves fixtures are off by default: nobody can forge statistics in production.
  const tern = await startTern(testConfig());
  try {
    const response = await postFixtures('127.0.0.1', tern.port, ROOT_KEY, FIXTURES);
    assert.equal(response.status, 404);
    assert.equal((await response.json()).error.code, 40400);
    const rest = new Ably.Rest(options(tern.port));
    const page = await rest.stats({ start: `${lastYear}-02`, end: `${lastYear}-03`, unit: 'month' });
    assert.deepEqual(page.items, []);
  } finally {
    await tern.stop();
  }
});

test('in a cluster any node reports the sum of every node’s statistics', async () => {
  // Proves the cluster-wide answer: a REST publish counted on us-east, its deliveries
  // counted on eu-west, fixtures stored on ap-south, all read from each node.
  const cluster = await startRegions({ extra: FIXTURES_ON });
  const clients = [];
  try {
    const [east, west, south] = cluster.nodes.map((n) => n.host);
    const rest = (host, extra = {}) => new Ably.Rest(options(cluster.port, { key: DEV_KEY, endpoint: host, ...extra }));
    for (const host of [east, west, south]) {
      await waitUntil(async () => {
        const body = await (await fetch(`http://${host}:${cluster.adminPort}/regions`)).json();
        return body.regions.reduce((n, r) => n + r.nodes.length, 0) === 3;
      }, 20000, `membership on ${host}`);
    }
    const start = Date.now();
    const subscriber = new Ably.Realtime(options(cluster.port, { key: DEV_KEY, endpoint: west }));
    clients.push(subscriber);
    await connected(subscriber);
    const got = [];
    await subscriber.channels.get('cluster-stats').subscribe((m) => got.push(m.data));
    for (let i = 0; i < 4; i++) await rest(east).channels.get('cluster-stats').publish('n', 'abcd');
    await waitUntil(() => got.length === 4, 15000, 'cross-region deliveries');
    const posted = await postFixtures(south, cluster.port, DEV_KEY, FIXTURES);
    assert.equal(posted.status, 201);

    for (const [host, binary] of [[east, false], [west, true], [south, false]]) {
      let sum = {};
      await waitUntil(async () => {
        sum = totals(await minutesSince(rest(host, { binary }), start));
        return sum['messages.outbound.realtime.messages.count'] === 4;
      }, 10000, `outbound seen from ${host}`);
      assert.equal(sum['messages.inbound.rest.messages.count'], 4, host);
      assert.equal(sum['messages.inbound.rest.messages.data'], 20, host);
      assert.equal(sum['connections.all.opened'], 1, host);
      const page = await rest(host).stats({ start: `${lastYear}-02-03:15`, end: `${lastYear}-02-03:15`, unit: 'hour' });
      assert.deepEqual(page.items.map((s) => s.entries['messages.inbound.all.messages.count']), [180], host);
      // Paging across nodes: one minute per page, the fixtures' five minutes.
      let minutes = await rest(host).stats({ start: `${lastYear}-02`, end: `${lastYear}-03`, limit: 1, direction: 'forwards' });
      const ids = [minutes.items[0].intervalId];
      while (minutes.hasNext()) {
        minutes = await minutes.next();
        ids.push(minutes.items[0].intervalId);
      }
      assert.equal(ids.length, 5, host);
    }
  } finally {
    for (const c of clients) c.close();
    await cluster.stop();
  }
});
