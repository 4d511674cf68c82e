'use strict';
/**
 * The sink's only output: one JSON object per line on stdout, so a log shipper needs no parser.
 * Callers pass facts (ids, counts, error codes), never event payloads.
 */

function log(level, msg, fields = {}) {
  const line = { ts: new Date().toISOString(), level, msg, ...fields };
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

/** The parts of an error worth a log line: message and codes, no stack, no query parameters. */
function describeError(err) {
  if (!err || typeof err !== 'object') return { error: String(err) };
  const out = { error: String(err.message || err).slice(0, 500) };
  if (err.code) out.errorCode = String(err.code);
  if (err.name && err.name !== 'Error') out.errorName = err.name;
  return out;
}

module.exports = { log, describeError };
