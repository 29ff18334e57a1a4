// A mocha reporter for the runner: the spec reporter's output for people (into the file's
// log), plus one JSON line per result appended to `--reporter-option output=FILE` as it
// happens, so a mocha process that is killed still leaves what it finished.
//
// Lines: {"kind":"test","title","state":"passed"|"failed"|"pending","durationMs","error"}
// for tests, {"kind":"hook", …} for a failed hook (its tests then do not run), and
// {"kind":"end"} when mocha finishes. Titles are mocha's full titles (suites + test).
'use strict';
const fs = require('fs');

// Resolve mocha from the suite being run (the working directory), not from this file.
const Mocha = require(require.resolve('mocha', { paths: [process.cwd()] }));

const ERROR_CHARS_MAX = 2000;

class RunnerReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    const output = options && options.reporterOptions && options.reporterOptions.output;
    if (!output) throw new Error('reporter.cjs needs --reporter-option output=FILE');
    const write = (record) => fs.appendFileSync(output, JSON.stringify(record) + '\n');
    const record = (state) => (test, err) => {
      const kind = test.type === 'hook' ? 'hook' : 'test';
      const line = { kind, title: test.fullTitle(), state, durationMs: test.duration || 0 };
      if (err) line.error = String((err && (err.stack || err.message)) || err).slice(0, ERROR_CHARS_MAX);
      write(line);
    };
    runner.on('pass', record('passed'));
    runner.on('fail', record('failed'));
    runner.on('pending', record('pending'));
    runner.once('end', () => write({ kind: 'end' }));
  }
}

module.exports = RunnerReporter;
