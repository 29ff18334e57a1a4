// known-failures.txt: one line per failing test (or hook) of ably-js's suite against Tern,
//
//   <file under test/> :: <mocha full title> :: <reason>
//
// '#' lines and blank lines are comments. A reason is `<cause>: <what>`, the cause one of
// CAUSES (docs/conformance.md counts the entries by it). The gate compares a run's
// failures with the entries of the files that ran.

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
    const first = line.indexOf(SEP);
    const last = line.lastIndexOf(SEP);
    if (first < 0 || last === first) throw new Error(`known-failures.txt line ${i + 1}: want "file${SEP}title${SEP}reason"`);
    entries.push({
      file: line.slice(0, first),
      title: line.slice(first + SEP.length, last),
      reason: line.slice(last + SEP.length),
    });
  });
  return entries;
}

export function formatKnown(entries) {
  const sorted = [...entries].sort((a, b) => a.file.localeCompare(b.file) || a.title.localeCompare(b.title));
  return HEADER + sorted.map((e) => `${e.file}${SEP}${e.title}${SEP}${e.reason}`).join('\n') + '\n';
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
export function gate(known, summary) {
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

/// The entries after a run: failures of the files that ran (reasons kept, new ones
/// `TODO reason`), `flaky:` entries and entries of other files unchanged.
export function updateKnown(known, summary) {
  const ran = new Set(summary.files.map((f) => f.file));
  const reasons = new Map(known.map((e) => [key(e.file, e.title), e.reason]));
  const kept = known.filter((e) => !ran.has(e.file) || isFlaky(e));
  const keptKeys = new Set(kept.map((e) => key(e.file, e.title)));
  let added = 0;
  const fresh = [...failures(summary).values()].filter((f) => !keptKeys.has(key(f.file, f.title))).map((f) => {
    const reason = reasons.get(key(f.file, f.title));
    if (!reason) added++;
    return { file: f.file, title: f.title, reason: reason || 'TODO reason' };
  });
  const freshKeys = new Set(fresh.map((e) => key(e.file, e.title)));
  const removed = known.filter(
    (e) => ran.has(e.file) && !keptKeys.has(key(e.file, e.title)) && !freshKeys.has(key(e.file, e.title)),
  ).length;
  return { entries: [...kept, ...fresh], added, removed };
}
