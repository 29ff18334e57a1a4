// Mutable messages and annotations through ably-js: update, delete and append (REST and
// realtime) reach subscribers with their actions and version serials; getMessage and
// history return the latest version, getMessageVersions every version; the capability
// decides who may change what; annotations are delivered only to attachments that ask
// for them, summarized on the channel and listed over REST; and all of it holds across
// the three regions of `tern dev`.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import Ably from 'ably';
import { connected, options, startTern, testConfig, waitUntil } from '../lib/tern.mjs';

async function code(promise) {
  try {
    await promise;
  } catch (err) {
    return err.code;
  }
  return 'no error';
}

const ownOnlyConfig = testConfig().replace(
  '[[apps.keys]]\nid = "limited"',
  `[[apps.keys]]
id = "own"
secret = "ownsecret"
capability = '{"*":["publish","subscribe","history","message-update-own","message-delete-own"]}'

[[apps.keys]]
id = "limited"`,
);

describe('one node', () => {
  let tern;
  const clients = [];
  const realtime = (extra = {}) => {
    const c = new Ably.Realtime(options(tern.port, extra));
    clients.push(c);
    return c;
  };
  const rest = (extra = {}) => new Ably.Rest(options(tern.port, extra));
  before(async () => { tern = await startTern(ownOnlyConfig); });
  after(async () => {
    for (const c of clients) c.close();
    await tern.stop();
  });

  for (const binary of [false, true]) {
    test(`update, append and delete reach a subscriber and read back in their latest version (binary=${binary})`, async () => {
      /// Proves each change is a channel event: subscribers get it with its action, the
      /// message's serial and a version serial that sorts after it; getMessage, history
      /// and versions agree with what they got.
      const name = `edits-${binary}`;
      const sub = await connected(realtime({ binary }));
      const got = [];
      await sub.channels.get(name).subscribe((m) => got.push(m));
      const channel = rest({ binary }).channels.get(name);
      const { serials: [serial] } = await channel.publish('greeting', 'Hello');
      const { versionSerial: v1 } = await channel.appendMessage({ serial, data: ' World' }, { description: 'more' });
      const { versionSerial: v2 } = await channel.updateMessage({ serial, data: 'Hi' }, { clientId: 'editor', metadata: { why: 'short' } });
      const { versionSerial: v3 } = await channel.deleteMessage({ serial }, { description: 'gone' });
      await waitUntil(() => got.length === 4, 5000, 'four events');
      assert.deepEqual(got.map((m) => [m.action, m.serial, m.name, m.data]), [
        ['message.create', serial, 'greeting', 'Hello'],
        ['message.append', serial, 'greeting', ' World'],
        ['message.update', serial, 'greeting', 'Hi'],
        ['message.delete', serial, 'greeting', 'Hi'],
      ]);
      assert.deepEqual(got.slice(1).map((m) => m.version.serial), [v1, v2, v3]);
      assert.ok(serial < v1 && v1 < v2 && v2 < v3, 'version serials sort in order');
      assert.equal(got[2].version.clientId, 'editor');
      assert.deepEqual(got[2].version.metadata, { why: 'short' });

      const latest = await channel.getMessage(serial);
      assert.deepEqual([latest.action, latest.data, latest.version.serial, latest.version.description], ['message.delete', 'Hi', v3, 'gone']);
      const versions = (await channel.getMessageVersions(serial)).items;
      assert.deepEqual(versions.map((m) => [m.action, m.data]), [
        ['message.create', 'Hello'],
        ['message.update', 'Hello World'],
        ['message.update', 'Hi'],
        ['message.delete', 'Hi'],
      ]);
      const history = (await channel.history()).items;
      assert.deepEqual(history.map((m) => [m.serial, m.action, m.data]), [[serial, 'message.delete', 'Hi']]);
    });
  }

  test('realtime changes are ACKed with their version serial; a rewind replays the joined message', async () => {
    /// Proves the realtime path (MESSAGE frames with a change action) and that rewind
    /// serves messages in their latest version.
    const client = await connected(realtime({ clientId: 'writer' }));
    const channel = client.channels.get('rt-edits');
    await channel.attach();
    const { serials: [serial] } = await channel.publish('n', 'a');
    const { versionSerial } = await channel.appendMessage({ serial, data: 'b' });
    assert.ok(versionSerial > serial);
    const late = await connected(realtime());
    const replayed = [];
    await late.channels.get('rt-edits', { params: { rewind: '5' } }).subscribe((m) => replayed.push(m));
    await waitUntil(() => replayed.length === 1, 5000, 'rewind');
    assert.deepEqual([replayed[0].serial, replayed[0].action, replayed[0].data, replayed[0].version.serial], [serial, 'message.update', 'ab', versionSerial]);
  });

  test('a serial the channel never had is 40400; the one it gave is found', async () => {
    /// Proves lookups of serials the channel never had fail with Ably's not-found code.
    const channel = rest().channels.get('unknown-serials');
    const { serials: [serial] } = await channel.publish('n', 'x');
    assert.equal((await channel.getMessage(serial)).data, 'x', 'the serial it was given is found');
    const other = serial.replace(/.:0000$/, (m) => `${m[0] === 'f' ? 'e' : 'f'}:0000`);
    assert.equal(await code(channel.getMessage(other)), 40400);
    assert.equal(await code(channel.getMessage('not-a-serial')), 40400);
    assert.equal(await code(channel.updateMessage({ serial: other, data: 'y' })), 40400);
    assert.equal(await code(channel.getMessageVersions(other)), 40400);
    assert.equal(await code(rest().channels.get('elsewhere').getMessage(serial)), 40400);
  });

  test('message-update-own and message-delete-own allow changing only one\'s own messages', async () => {
    /// Proves the capability rule: -own needs the caller's clientId to be the author's.
    const alice = rest({ key: 'test.own:ownsecret', clientId: 'alice' }).channels.get('own-edits');
    const bob = rest({ key: 'test.own:ownsecret', clientId: 'bob' }).channels.get('own-edits');
    const { serials: [serial] } = await alice.publish('n', 'by alice');
    assert.equal(await code(bob.updateMessage({ serial, data: 'by bob' })), 40160);
    assert.equal(await code(bob.deleteMessage({ serial })), 40160);
    await alice.updateMessage({ serial, data: 'edited' });
    assert.equal((await bob.getMessage(serial)).data, 'edited');
    await alice.deleteMessage({ serial });
    assert.equal((await alice.getMessage(serial)).action, 'message.delete');
  });

  test('annotations reach only annotation subscribers, are summarized and listed', async () => {
    /// Proves ANNOTATION frames, the annotation_subscribe mode, summaries as
    /// message.summary events and REST publish/get of annotations.
    const watcher = await connected(realtime({ clientId: 'watcher' }));
    const plain = await connected(realtime({ clientId: 'plain' }));
    const channel = watcher.channels.get('reactions', { modes: ['publish', 'subscribe', 'annotation_publish', 'annotation_subscribe'] });
    await channel.attach();
    const annotations = [];
    const summaries = [];
    channel.annotations.subscribe((a) => annotations.push(a));
    await channel.subscribe('message.summary', () => {});
    channel.subscriptions.on((m) => { if (m.action === 'message.summary') summaries.push(m); });
    const plainGot = [];
    const plainChannel = plain.channels.get('reactions');
    await plainChannel.attach();
    plainChannel.annotations.subscriptions.on((a) => plainGot.push(a));

    const { serials: [serial] } = await channel.publish('post', 'hello');
    await channel.annotations.publish(serial, { type: 'reaction:distinct.v1', name: '👍' });
    const other = new Ably.Rest(options(tern.port, { clientId: 'other' }));
    await other.channels.get('reactions').annotations.publish(serial, { type: 'reaction:distinct.v1', name: '👍' });
    await waitUntil(() => annotations.length === 2, 5000, 'annotations delivered');
    assert.deepEqual(annotations.map((a) => [a.action, a.messageSerial, a.clientId]), [
      ['annotation.create', serial, 'watcher'],
      ['annotation.create', serial, 'other'],
    ]);
    assert.ok(annotations.every((a) => a.serial > serial));
    await waitUntil(
      () => summaries.some((s) => s.annotations.summary['reaction:distinct.v1']?.['👍']?.total === 2),
      5000,
      'summary of both',
    );
    assert.equal(summaries.at(-1).serial, serial);
    assert.deepEqual(summaries.at(-1).annotations.summary['reaction:distinct.v1']['👍'].clientIds, ['other', 'watcher']);
    assert.equal(plainGot.length, 0, 'no annotations without annotation_subscribe');

    const listed = await other.channels.get('reactions').annotations.get(serial, { limit: 1 });
    assert.deepEqual(listed.items.map((a) => a.clientId), ['watcher']);
    const next = await listed.next();
    assert.deepEqual(next.items.map((a) => a.clientId), ['other']);
    const read = await other.channels.get('reactions').getMessage(serial);
    assert.equal(read.annotations.summary['reaction:distinct.v1']['👍'].total, 2);
    assert.equal(await code(channel.annotations.publish(serial.replace(/^0/, '1'), { type: 'reaction:distinct.v1', name: 'x' })), 40400);
  });
});

describe('three regions (tern dev)', () => {
  const DEV_KEY = 'dev.root:dev-secret-change-me';
  let tern;
  const clients = [];
  before(async () => { tern = await startTern('', { args: ['dev', '--port', '0'], listening: 3 }); });
  after(async () => {
    for (const c of clients) c.close();
    await tern.stop();
  });

  test('a message changed and annotated in other regions reads the same everywhere', async () => {
    /// Proves changes and annotations replicate like messages: the serial and version
    /// serial are the same in every region, and so are the latest version and the
    /// annotation list.
    const [east, west, south] = tern.ports;
    const restAt = (port, extra = {}) => new Ably.Rest(options(port, { key: DEV_KEY, ...extra })).channels.get('world-edits');
    const sub = new Ably.Realtime(options(south, { key: DEV_KEY }));
    clients.push(sub);
    await connected(sub);
    const got = [];
    await sub.channels.get('world-edits').subscribe((m) => got.push(m));

    const { serials: [serial] } = await restAt(east).publish('n', 'from east');
    // The change is made in the west once the message has reached it.
    await waitUntil(async () => (await code(restAt(west).getMessage(serial))) === 'no error', 10000, 'message in the west');
    const { versionSerial } = await restAt(west).updateMessage({ serial, data: 'edited in west' });
    await restAt(south, { clientId: 'southerner' }).annotations.publish(serial, { type: 'reaction:distinct.v1', name: '🌍' });

    await waitUntil(() => got.some((m) => m.action === 'message.update'), 10000, 'update reaches the south');
    const update = got.find((m) => m.action === 'message.update');
    assert.deepEqual([update.serial, update.version.serial, update.data], [serial, versionSerial, 'edited in west']);
    for (const port of [east, west, south]) {
      let latest;
      await waitUntil(async () => {
        latest = await restAt(port).getMessage(serial);
        return latest.version.serial === versionSerial;
      }, 10000, `update stored at ${port}`);
      assert.equal(latest.data, 'edited in west');
      let listed = [];
      await waitUntil(async () => {
        listed = (await restAt(port).annotations.get(serial, {})).items;
        return listed.length === 1;
      }, 10000, `annotation stored at ${port}`);
      assert.deepEqual(listed.map((a) => [a.clientId, a.name]), [['southerner', '🌍']]);
    }
  });
});
