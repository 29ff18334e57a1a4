// Outbound webhooks (docs/functions.md): a function server written here, against Ably's
// webhook docs only, receives what tern sends for ably-js's publishes and presence.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connected, options, startTern, ternBin, testConfig, waitUntil } from '../lib/tern.mjs';
import { items, startFunction } from '../lib/function.mjs';

const KEY_NAME = 'test.root';
const KEY_SECRET = 'rootsecret';

function withRules(rules, history = 'mode = "memory"') {
  // `[[apps.rules]]` after the config's `[[apps.keys]]` belong to its one app.
  return testConfig({ history }) + rules;
}

test('ably-js publishes and presence reach a signed, batched function, shaped as Ably documents', async () => {
  // Proves: every message of a matching channel arrives once, in order, with a valid
  // X-Ably-Signature; bodies parse with Ably's own Message.fromEncodedArray; presence
  // arrives as presence.message; a channel the filter excludes sends nothing; the
  // single non-enveloped mode sends the data as the body with x-ably-message-* headers.
  const fn = await startFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET });
  const tern = await startTern(withRules(`
[[apps.rules]]
id = "batched"
channel_filter = "^hooked:"
events = ["channel.message", "channel.presence"]
url = "http://127.0.0.1:${fn.port}/hook"
headers = { "x-team" = "blue" }
batch_window_ms = 50
sign_with_key = "root"

[[apps.rules]]
id = "raw"
channel_filter = "^raw$"
url = "http://127.0.0.1:${fn.port}/raw"
request_mode = "single"
enveloped = false
`));
  const client = new Ably.Realtime(options(tern.port, { clientId: 'alice' }));
  try {
    await connected(client);
    const channel = client.channels.get('hooked:a');
    const sent = [];
    for (let i = 0; i < 20; i++) {
      const data = i === 3 ? { nested: [1, 2, 3] } : i === 4 ? Buffer.from([0, 1, 255]) : `m${i}`;
      sent.push(data);
      await channel.publish(`n${i}`, data);
    }
    await client.channels.get('other').publish('x', 'not for the function');
    await channel.presence.enter('here');
    await channel.presence.leave();
    await client.channels.get('raw').publish('rawname', { a: 1 });

    await waitUntil(() => items(fn).filter((i) => i.source === 'channel.message').length >= 20
      && items(fn).filter((i) => i.source === 'channel.presence').length >= 2
      && fn.requests.some((r) => r.path === '/raw'), 15000, 'webhooks');

    assert.equal(fn.badSignatures, 0);
    const hook = fn.requests.filter((r) => r.path === '/hook');
    for (const request of hook) {
      assert.equal(request.headers['x-ably-key'], KEY_NAME);
      assert.ok(request.headers['x-ably-signature']);
      assert.equal(request.headers['x-ably-version'], '1.2');
      assert.equal(request.headers['x-team'], 'blue');
    }
    const messageItems = items(fn).filter((i) => i.source === 'channel.message');
    assert.equal(messageItems.length, 20, 'each message once');
    const decoded = [];
    for (const item of messageItems) {
      assert.equal(item.webhookId, 'batched');
      assert.equal(item.name, 'channel.message');
      assert.equal(item.data.channelId, 'hooked:a');
      assert.equal(item.data.site, 'tern');
      assert.equal(typeof item.timestamp, 'number');
      const [message] = await Ably.Realtime.Message.fromEncodedArray(item.data.messages);
      assert.equal(message.clientId, 'alice');
      assert.equal(message.connectionId, client.connection.id);
      assert.ok(message.id);
      decoded.push(message);
    }
    assert.deepEqual(decoded.map((m) => m.name), sent.map((_, i) => `n${i}`), 'in publish order');
    assert.deepEqual(decoded[3].data, { nested: [1, 2, 3] });
    assert.deepEqual(Buffer.from(decoded[4].data), Buffer.from([0, 1, 255]));
    assert.equal(decoded[0].data, 'm0');

    const presence = items(fn).filter((i) => i.source === 'channel.presence');
    assert.deepEqual(presence.map((i) => i.name), ['presence.message', 'presence.message']);
    const members = await Ably.Realtime.PresenceMessage.fromEncodedArray(
      presence.flatMap((i) => i.data.presence));
    assert.deepEqual(members.map((m) => m.action), ['enter', 'leave']);
    assert.equal(members[0].clientId, 'alice');
    assert.equal(members[0].data, 'here');

    assert.ok(!items(fn).some((i) => i.data.channelId === 'other'), 'filtered out');

    const raw = fn.requests.filter((r) => r.path === '/raw');
    assert.equal(raw.length, 1);
    assert.deepEqual(JSON.parse(raw[0].body.toString()), { a: 1 });
    assert.equal(raw[0].headers['x-ably-envelope-channel'], 'raw');
    assert.equal(raw[0].headers['x-ably-envelope-source'], 'channel.message');
    assert.equal(raw[0].headers['x-ably-envelope-rule-id'], 'raw');
    assert.equal(raw[0].headers['x-ably-message-name'], 'rawname');
    assert.equal(raw[0].headers['x-ably-message-client-id'], 'alice');
    assert.ok(raw[0].headers['x-ably-message-id']);
    assert.equal(raw[0].headers['x-ably-signature'], undefined, 'unsigned rule');
  } finally {
    client.close();
    await tern.stop();
    fn.server.close();
  }
});

test('a function down for a while gets every message once it is back', async () => {
  // Proves retries: 503s are retried (same events, in order) until the function answers.
  const fn = await startFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET });
  fn.mode = 'down';
  const tern = await startTern(withRules(`
[[apps.rules]]
id = "retry"
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 20
batch_items_max = 10
retry_delay_initial_ms = 100
retry_delay_max_ms = 400
sign_with_key = "root"
`));
  try {
    const rest = new Ably.Rest(options(tern.port));
    const channel = rest.channels.get('down');
    for (let i = 0; i < 30; i++) await channel.publish('n', `d${i}`);
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(fn.requests.length, 0, 'nothing accepted while down');
    fn.mode = 'ok';
    await waitUntil(() => items(fn).length >= 30, 10000, '30 items');
    const data = (await Promise.all(items(fn).map((i) => Ably.Realtime.Message.fromEncodedArray(i.data.messages))))
      .flat().map((m) => m.data);
    assert.deepEqual(data, Array.from({ length: 30 }, (_, i) => `d${i}`));
    assert.equal(fn.badSignatures, 0);
  } finally {
    await tern.stop();
    fn.server.close();
  }
});

test('SIGKILL with deliveries in flight: after restart every ACKed message reaches the function', async () => {
  // Proves the outbox: webhooks of ACKed publishes survive kill -9 of the delivering
  // node mid-batch; delivery is at least once and the item serial de-duplicates.
  const fn = await startFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET });
  fn.mode = 'slow';
  // 40 requests of 5 at 250 ms each: delivery takes 10 s, publishing well under that.
  fn.slowMs = 250;
  const config = withRules(`
[[apps.rules]]
id = "durable"
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 10
batch_items_max = 5
retry_delay_initial_ms = 100
retry_delay_max_ms = 400
sign_with_key = "root"
`, 'mode = "redb"\npath = "data/history.redb"');
  const total = 200;
  const first = await startTern(config);
  const client = new Ably.Realtime(options(first.port, { clientId: 'k' }));
  const acked = [];
  try {
    await connected(client);
    const channel = client.channels.get('durable');
    const publishes = [];
    for (let i = 0; i < total; i++) {
      publishes.push(channel.publish('n', `d${i}`).then(() => acked.push(`d${i}`)));
    }
    await Promise.all(publishes);
    // Killed once some batches are delivered and one is in flight at the function.
    await waitUntil(() => fn.serials.size >= 20 && fn.inFlight > 0, 15000, 'deliveries in flight');
  } finally {
    client.close();
    await first.stop('SIGKILL');
  }
  const beforeKill = fn.serials.size;
  assert.ok(beforeKill < total, `killed mid-delivery (${beforeKill} of ${total} delivered)`);
  assert.equal(acked.length, total);

  const second = await startTern(config, { dir: first.dir });
  try {
    await waitUntil(() => fn.serials.size >= total, 30000, `all ${total} serials`);
    // Let anything still queued arrive, so duplicates are counted, not guessed.
    await new Promise((r) => setTimeout(r, 500));
    const data = new Set();
    let received = 0;
    for (const item of items(fn)) {
      for (const m of await Ably.Realtime.Message.fromEncodedArray(item.data.messages)) data.add(m.data);
      received += 1;
    }
    assert.deepEqual([...data].sort(), [...acked].sort(), 'every ACKed message, none other');
    assert.equal(fn.serials.size, total, 'exactly once after de-duplication by serial');
    const duplicates = received - total;
    // At most the batch in flight at the kill and the delivered batch whose mark had
    // not reached the disk yet.
    assert.ok(duplicates <= 10, `${duplicates} duplicates`);
    console.log(`# webhooks kill -9: ${beforeKill} delivered before the kill, ${duplicates} raw duplicates after restart`);
    assert.equal(fn.badSignatures, 0);
  } finally {
    await second.stop();
    fn.server.close();
  }
});

test('SIGKILL while publishing: every ACKed message reaches the function after restart', async () => {
  // Proves the outbox row is durable with the event, before its ACK: the node is killed
  // with publishes in flight, and every publish ably-js saw ACKed is delivered later
  // (those not ACKed may or may not be).
  const fn = await startFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET });
  const config = withRules(`
[[apps.rules]]
id = "acked"
url = "http://127.0.0.1:${fn.port}/hook"
batch_window_ms = 10
batch_items_max = 50
retry_delay_initial_ms = 100
retry_delay_max_ms = 400
`, 'mode = "redb"\npath = "data/history.redb"');
  const first = await startTern(config);
  const client = new Ably.Realtime(options(first.port, { clientId: 'p' }));
  const acked = [];
  try {
    await connected(client);
    const channel = client.channels.get('acked');
    // A window of 20 publishes in flight, until the kill below ends them.
    let next = 0;
    const publisher = async () => {
      while (next < 5000) {
        const data = `d${next++}`;
        try {
          await channel.publish('n', data);
          acked.push(data);
        } catch {
          return;
        }
      }
    };
    const publishers = Array.from({ length: 20 }, publisher);
    await waitUntil(() => acked.length >= 300, 20000, '300 ACKs');
    await first.stop('SIGKILL');
    client.close();
    await Promise.allSettled(publishers);
  } finally {
    client.close();
    await first.stop('SIGKILL');
  }
  const ackedAtKill = [...acked];
  const second = await startTern(config, { dir: first.dir });
  try {
    const delivered = async () => {
      const data = new Set();
      for (const item of items(fn)) {
        for (const m of await Ably.Realtime.Message.fromEncodedArray(item.data.messages)) data.add(m.data);
      }
      return data;
    };
    let missing = ackedAtKill;
    await waitUntil(async () => {
      const data = await delivered();
      missing = ackedAtKill.filter((d) => !data.has(d));
      return missing.length === 0;
    }, 30000, 'every ACKed message delivered').catch((e) => {
      throw new Error(`${e.message}: ${missing.length} of ${ackedAtKill.length} ACKed missing, e.g. ${missing.slice(0, 5)}`);
    });
    const received = items(fn).length;
    console.log(`# webhooks kill -9 while publishing: ${ackedAtKill.length} ACKed, all delivered; ${received - fn.serials.size} raw duplicates`);
  } finally {
    await second.stop();
    fn.server.close();
  }
});

test('an https:// function gets its webhooks once tern trusts its certificate, and none before', async () => {
  // Proves webhooks over TLS with the certificate verified (system roots, SSL_CERT_FILE).
  const dir = mkdtempSync(join(tmpdir(), 'tern-fn-tls-'));
  execFileSync(ternBin, ['certs', '--out', dir, '--edge-names', 'localhost,127.0.0.1']);
  const tls = { cert: readFileSync(join(dir, 'edge.pem')), key: readFileSync(join(dir, 'edge.key')) };
  const fn = await startFunction({ keyName: KEY_NAME, keySecret: KEY_SECRET, tls });
  const rules = `
[[apps.rules]]
id = "secure"
url = "https://localhost:${fn.port}/hook"
batch_window_ms = 20
sign_with_key = "root"
`;
  const publishFive = async (tern, prefix) => {
    const rest = new Ably.Rest(options(tern.port));
    for (let i = 0; i < 5; i++) await rest.channels.get('secure').publish('n', `${prefix}${i}`);
  };
  // Not trusted: nothing is delivered (TLS fails, the events wait and are retried).
  const untrusting = await startTern(withRules(rules));
  try {
    await publishFive(untrusting, 'u');
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(items(fn).length, 0, 'no request reached a function whose certificate is not trusted');
  } finally {
    await untrusting.stop();
  }
  process.env.SSL_CERT_FILE = join(dir, 'edge-ca.pem');
  let trusting;
  try {
    trusting = await startTern(withRules(rules));
  } finally {
    delete process.env.SSL_CERT_FILE;
  }
  try {
    await publishFive(trusting, 't');
    await waitUntil(() => items(fn).length >= 5, 10000, 'five webhooks over https');
    assert.deepEqual(items(fn).flatMap((i) => i.data.messages.map((m) => m.data)), ['t0', 't1', 't2', 't3', 't4']);
    assert.equal(fn.badSignatures, 0);
  } finally {
    await trusting.stop();
    fn.server.close();
  }
});
