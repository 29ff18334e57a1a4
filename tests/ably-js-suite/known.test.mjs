// The known-failures gate's rules (node --test; run.sh runs this before the suite).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { formatKnown, gate, parseKnown, updateKnown } from './known.mjs';
import { planApp, ternConfig } from './provisioner.mjs';

const summary = (files) => ({
  files: Object.entries(files).map(([file, tests]) => ({
    file,
    finished: true,
    tests: Object.entries(tests).map(([title, state]) => ({ title, kind: 'test', state })),
  })),
});

const known = parseKnown(`# comment
a.test.js :: s one :: differs: x
a.test.js :: s two :: missing: y
a.test.js :: s ping :: flaky: z
b.test.js :: s three :: unreachable: w
`);

/// A failure not listed is new; a listed test of a file that ran and passed is stale.
test('gate reports new failures and stale entries', () => {
  const r = gate(known, summary({ 'a.test.js': { 's one': 'failed', 's two': 'passed', 's new': 'failed' } }));
  assert.deepEqual(r.newFailures.map((f) => f.title), ['s new']);
  assert.deepEqual(r.stale.map((e) => [e.title, e.seen]), [['s two', 'passed']]);
  assert.equal(r.knownFailing, 1);
});

/// A listed test that did not run at all (its file ran) is stale too: it no longer fails.
test('gate counts a listed test that did not run as stale', () => {
  const r = gate(known, summary({ 'a.test.js': { 's one': 'failed', 's two': 'failed' } }));
  assert.deepEqual(r.stale, []);
  const gone = gate(known, summary({ 'a.test.js': { 's one': 'failed' } }));
  assert.deepEqual(gone.stale.map((e) => [e.title, e.seen]), [['s two', 'not run']]);
});

/// Entries of files that did not run are neither stale nor counted.
test('gate ignores entries of files that did not run', () => {
  const r = gate(known, summary({ 'a.test.js': { 's one': 'failed', 's two': 'failed' } }));
  assert.ok(!r.stale.some((e) => e.file === 'b.test.js'));
});

/// A flaky entry may pass or fail without failing the gate.
test('gate accepts a flaky entry either way', () => {
  for (const state of ['passed', 'failed']) {
    const r = gate(known, summary({ 'a.test.js': { 's one': 'failed', 's two': 'failed', 's ping': state } }));
    assert.deepEqual([r.newFailures, r.stale], [[], []]);
    assert.equal(r.flaky[0].seen, state);
  }
});

/// A file whose mocha did not finish fails the gate.
test('gate reports unfinished files', () => {
  const s = summary({ 'a.test.js': { 's one': 'failed', 's two': 'failed' } });
  s.files[0].finished = false;
  assert.deepEqual(gate(known, s).unfinished, ['a.test.js']);
});

/// --update-known keeps reasons, marks new failures TODO, drops passing entries of the
/// files that ran, and keeps flaky entries and other files' entries.
test('updateKnown keeps reasons and marks new entries', () => {
  const { entries, added, removed } = updateKnown(
    known,
    summary({ 'a.test.js': { 's one': 'failed', 's two': 'passed', 's new': 'failed', 's ping': 'passed' } }),
  );
  const byTitle = Object.fromEntries(entries.map((e) => [e.title, e.reason]));
  assert.deepEqual(byTitle, {
    's one': 'differs: x',
    's new': 'TODO reason',
    's ping': 'flaky: z',
    's three': 'unreachable: w',
  });
  assert.deepEqual([added, removed], [1, 1]);
});

const scoped = parseKnown(`a.test.js :: s one :: differs: x
a.test.js :: s ws only :: harness: y :: transports=web_socket
a.test.js :: s comet :: unreachable: z :: transports=web_socket,comet
`);
const onTransports = (transports, files) => ({ ...summary(files), transports });

/// An entry scoped to transports holds only for runs on exactly those: elsewhere it is
/// neither stale (passing) nor an excuse (failing).
test('gate applies a transports= entry only to runs on those transports', () => {
  const ws = gate(scoped, summary({ 'a.test.js': { 's one': 'failed', 's ws only': 'failed' } }));
  assert.deepEqual([ws.newFailures, ws.stale, ws.knownFailing], [[], [], 2]);
  const both = 'web_socket,comet';
  const passing = gate(scoped, onTransports(both, { 'a.test.js': { 's one': 'failed', 's ws only': 'passed', 's comet': 'failed' } }));
  assert.deepEqual([passing.newFailures, passing.stale, passing.knownFailing], [[], [], 2]);
  const failing = gate(scoped, onTransports(both, { 'a.test.js': { 's one': 'failed', 's ws only': 'failed', 's comet': 'failed' } }));
  assert.deepEqual(failing.newFailures.map((f) => f.title), ['s ws only']);
});

/// --update-known after a run on other transports scopes its new entries to them and
/// keeps the entries of other transports as they are.
test('updateKnown scopes new entries to the run and keeps other scopes', () => {
  const both = 'web_socket,comet';
  const { entries, added, removed } = updateKnown(
    scoped,
    onTransports(both, { 'a.test.js': { 's one': 'failed', 's ws only': 'failed', 's comet': 'passed', 's new': 'failed' } }),
  );
  // 's ws only' now fails on both: a second entry, for this run's transports.
  const pairs = entries.map((e) => `${e.title} @ ${e.transports ?? ''}`).sort();
  assert.deepEqual(pairs, [`s new @ ${both}`, 's one @ ', 's ws only @ web_socket', `s ws only @ ${both}`]);
  assert.deepEqual([added, removed], [2, 1]);
});

/// The file format round-trips, including a title that contains the separator.
test('known-failures format round-trips', () => {
  const entries = [{ file: 'a.test.js', title: 'odd :: title', reason: 'missing: q' }, ...known, ...scoped];
  assert.deepEqual(
    new Set(parseKnown(formatKnown(entries)).map((e) => JSON.stringify(e))),
    new Set(entries.map((e) => JSON.stringify(e))),
  );
});

/// The provisioner answers what testapp_manager checks (as many keys and namespaces as
/// asked, keyStr = keyName:secret) and writes a tern config with the asked capabilities.
test('provisioner plans the app the suite asks for', () => {
  const app = planApp({
    limits: { presence: { maxMembers: 250 } },
    keys: [{}, { capability: '{ "a:*":["subscribe"] }' }, { revocableTokens: true }],
    namespaces: [{ id: 'persisted', persisted: true }],
    channels: [],
  });
  assert.equal(app.keys.length, 3);
  assert.equal(app.namespaces.length, 1);
  for (const key of app.keys) {
    assert.equal(key.keyStr, `${key.keyName}:${key.keySecret}`);
    assert.ok(key.keyName.startsWith(`${app.appId}.`));
  }
  assert.equal(app.keys[1].capability, '{ "a:*":["subscribe"] }');
  const config = ternConfig(app);
  assert.match(config, /presence_members_max = 250/);
  assert.ok(config.includes('capability = "{ \\"a:*\\":[\\"subscribe\\"] }"'));
});
