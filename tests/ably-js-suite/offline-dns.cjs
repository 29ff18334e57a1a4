// Preloaded into each mocha process (--require): Ably's own hosts fail to resolve at once
// (ENOTFOUND), whatever this machine's network can reach. The tests that need them
// (echo.ably.io responders, the connectivity check, the cloud sandbox) are listed as
// unreachable in known-failures.txt; this keeps them failing the same way, and fast,
// on every machine, offline or not. Nothing else is resolved differently.
'use strict';
const dns = require('dns');

const OFFLINE = /(^|\.)(ably\.io|ably\.net|ably-nonprod\.net|ably-realtime\.com|ably\.com)\.?$/i;

function notFound(hostname) {
  const err = new Error(`getaddrinfo ENOTFOUND ${hostname} (offline-dns.cjs: Ably hosts are not reachable here)`);
  err.code = 'ENOTFOUND';
  err.errno = -3008;
  err.syscall = 'getaddrinfo';
  err.hostname = hostname;
  return err;
}

const lookup = dns.lookup;
dns.lookup = function offlineLookup(hostname, options, callback) {
  if (typeof options === 'function') callback = options;
  if (typeof hostname === 'string' && OFFLINE.test(hostname)) {
    process.nextTick(callback, notFound(hostname));
    return {};
  }
  return lookup.apply(this, arguments);
};

const promiseLookup = dns.promises.lookup;
dns.promises.lookup = function offlineLookup(hostname, ...rest) {
  if (typeof hostname === 'string' && OFFLINE.test(hostname)) return Promise.reject(notFound(hostname));
  return promiseLookup.call(this, hostname, ...rest);
};
