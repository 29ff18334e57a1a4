// known-failures.txt: one line per failing test (or hook) of ably-js's suite against Tern,
//
//   <file under test/> :: <mocha full title> :: <reason> [:: transports=<list>]
//
// '#' lines and blank lines are comments. A reason is `<cause>: <what>`, the cause one of
// CAUSES (docs/conformance.md counts the entries by it). The gate compares a run's
// failures with the entries of the files that ran. An entry with `transports=<list>`
// holds only for runs on exactly those transports (run.mjs --transports; a summary
// without `transports` is a `web_socket` run) and is ignored by others: a test that
// fails only on WebSocket, or exists only when comet runs too.

/// Reasons start with one of these.
export const CAUSES = {
  differs: 'Tern behaves differently from Ably (a protocol gap to fix)',
  unimplemented: 'a protocol feature Tern does not implement',
  missing: 'a product feature Tern lacks',
  unreachable: 'needs a host or network this machine cannot give (offline)',
  harness: 'the local-sandbox harness itself, not the server',
  flaky: 'passes or fails by timing alone; the gate accepts either (kept in the list either way)',
};

const isFlaky = (entry) => entry.reason.startsWith('flaky:');

const SEP = ' :: ';
const SCOPE = 'transports=';
/// The transports of a run summary (runs before the option existed were WebSocket only).
const runTransports = (summary) => summary.transports || 'web_socket';
/// Whether an entry holds for a run on `transports`.
const holds = (entry, transports) => !entry.transports || entry.transports === transports;
const HEADER = `# ably-js 2.26.0's own suite against Tern: the tests known to fail, one per line:
#   <file under test/> :: <mocha full title> :: <cause>: <reason>
# causes: ${Object.keys(CAUSES).join(', ')} (tests/ably-js-suite/known.mjs says what each means).
# The gate (tests/ably-js-suite/run.sh) fails on a failure not listed here and on a listed
# test that did not fail (except \`flaky:\` entries, which may do either). Regenerate after
# a run with \`tests/ably-js-suite/run.sh --update-known\` (reasons are kept; new entries
# say TODO reason and need one).
`;

export function parseKnown(text) {
  const entries = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trimEnd();
    if (!line.trim() || line.trimStart().startsWith('#')) return;
    let rest = line;
    let transports;
    const scope = rest.lastIndexOf(SEP + SCOPE);
    if (scope >= 0) {
      transports = rest.slice(scope + SEP.length + SCOPE.length);
      rest = rest.slice(0, scope);
    }
    const first = rest.indexOf(SEP);
    const last = rest.lastIndexOf(SEP);
    if (first < 0 || last === first) throw new Error(`known-failures.txt line ${i + 1}: want "file${SEP}title${SEP}reason"`);
    const entry = {
      file: rest.slice(0, first),
      title: rest.slice(first + SEP.length, last),
      reason: rest.slice(last + SEP.length),
    };
    if (transports) entry.transports = transports;
    entries.push(entry);
  });
  return entries;
}

export function formatKnown(entries) {
  const sorted = [...entries].sort((a, b) => a.file.localeCompare(b.file) || a.title.localeCompare(b.title));
  const line = (e) => `${e.file}${SEP}${e.title}${SEP}${e.reason}${e.transports ? `${SEP}${SCOPE}${e.transports}` : ''}`;
  return HEADER + sorted.map(line).join('\n') + '\n';
}

const key = (file, title) => `${file}\n${title}`;

/// Failures (tests and hooks) of a run summary, keyed by file and title.
function failures(summary) {
  const out = new Map();
  for (const f of summary.files) {
    for (const t of f.tests) if (t.state === 'failed') out.set(key(f.file, t.title), { file: f.file, ...t });
  }
  return out;
}

/// New failures (not listed), stale entries (listed, of a file that ran, did not fail; a
/// `flaky:` entry is never stale), files whose mocha did not finish, and how the flaky
/// entries went.
export function gate(all, summary) {
  const known = all.filter((e) => holds(e, runTransports(summary)));
  const ran = new Map(summary.files.map((f) => [f.file, f]));
  const failed = failures(summary);
  const listed = new Set(known.map((e) => key(e.file, e.title)));
  const newFailures = [...failed.values()].filter((f) => !listed.has(key(f.file, f.title)));
  const stale = [];
  const flaky = [];
  let knownFailing = 0;
  for (const e of known) {
    const file = ran.get(e.file);
    if (!file) continue;
    if (isFlaky(e)) {
      const test = file.tests.find((t) => t.title === e.title);
      flaky.push({ ...e, seen: test ? test.state : 'not run' });
      continue;
    }
    if (failed.has(key(e.file, e.title))) {
      knownFailing++;
      continue;
    }
    const test = file.tests.find((t) => t.title === e.title);
    stale.push({ ...e, seen: test ? test.state : 'not run' });
  }
  const unfinished = summary.files.filter((f) => !f.finished).map((f) => f.file);
  return { newFailures, stale, unfinished, knownFailing, flaky };
}

/// The entries after a run: failures of the files that ran (reasons and transport scopes
/// kept, new ones `TODO reason`, scoped to the run's transports unless it was a default
/// run), `flaky:` entries, entries of other files and entries for other transports
/// unchanged.
export function updateKnown(known, summary) {
  const transports = runTransports(summary);
  const ran = new Set(summary.files.map((f) => f.file));
  const previous = new Map(known.filter((e) => holds(e, transports)).map((e) => [key(e.file, e.title), e]));
  const kept = known.filter((e) => !ran.has(e.file) || isFlaky(e) || !holds(e, transports));
  // Only entries that hold for this run stand for its failures.
  const keptKeys = new Set(kept.filter((e) => holds(e, transports)).map((e) => key(e.file, e.title)));
  let added = 0;
  const fresh = [...failures(summary).values()].filter((f) => !keptKeys.has(key(f.file, f.title))).map((f) => {
    const before = previous.get(key(f.file, f.title));
    if (before) return before;
    added++;
    const entry = { file: f.file, title: f.title, reason: 'TODO reason' };
    if (transports !== 'web_socket') entry.transports = transports;
    return entry;
  });
  const freshKeys = new Set(fresh.map((e) => key(e.file, e.title)));
  const removed = known.filter(
    (e) =>
      ran.has(e.file) &&
      holds(e, transports) &&
      !keptKeys.has(key(e.file, e.title)) &&
      !freshKeys.has(key(e.file, e.title)),
  ).length;
  return { entries: [...kept, ...fresh], added, removed };
}
