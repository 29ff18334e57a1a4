// Preloaded into each mocha process (--require) when the runner's --timeout-cap is set:
// no test or hook waits longer than ABLY_SUITE_TIMEOUT_CAP_MS for mocha's timeout. The
// suite sets `this.timeout(60 * 1000)` in its describes, which a --timeout flag cannot
// lower; tests that fail by never finishing then fail sooner. A test that passes takes
// far less than the cap (docs/conformance.md: how the cap was measured), so this decides
// only how long a failure takes to be reported, not whether a test passes.
'use strict';
const Mocha = require(require.resolve('mocha', { paths: [process.cwd()] }));

const cap = Number(process.env.ABLY_SUITE_TIMEOUT_CAP_MS || 0);
if (cap > 0) {
  for (const proto of [Mocha.Runnable.prototype, Mocha.Suite.prototype]) {
    const timeout = proto.timeout;
    proto.timeout = function cappedTimeout(ms) {
      if (!arguments.length) return timeout.call(this);
      timeout.call(this, ms);
      const set = timeout.call(this);
      // 0 means "no timeout" to mocha: that too is capped.
      return set === 0 || set > cap ? timeout.call(this, cap) : this;
    };
  }
}
