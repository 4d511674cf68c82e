'use strict';
/**
 * Decoding of one stream entry into a status event (CONTRACT.md section 6), with no I/O.
 *
 * Everything PostgreSQL could reject for its content is refused or repaired here, so that a
 * batch that fails to commit fails because of the database, never because of an event: a
 * rejected entry is acked and counted, a database failure is retried.
 */

const RUN_STATUSES_TERMINAL = new Set(['SUCCESS', 'FAILED', 'CANCELED']);
const STEP_STATUSES_TERMINAL = new Set(['SUCCESS', 'FAILED', 'SKIPPED', 'CANCELED']);
// JavaScript Date's range; inside PostgreSQL's timestamptz range, and epoch ms are never negative.
const MAX_EPOCH_MS = 8.64e15;
const MAX_INT4 = 2147483647;

class MalformedEvent extends Error {}

/**
 * PostgreSQL text and jsonb cannot hold NUL, and jsonb refuses lone surrogate escapes: replace
 * both, in keys too, before anything reaches a query.
 */
function clean(value) {
  if (typeof value === 'string') return value.replaceAll('\u0000', '\uFFFD').toWellFormed();
  if (Array.isArray(value)) return value.map(clean);
  if (value !== null && typeof value === 'object') {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[clean(k)] = clean(v);
    return out;
  }
  return value;
}

function requiredString(obj, name) {
  const v = obj[name];
  if (typeof v !== 'string' || v === '') {
    throw new MalformedEvent(`${name}: expected non-empty string`);
  }
  return v;
}

function optionalString(obj, name) {
  const v = obj[name];
  if (v === undefined || v === null) return null;
  if (typeof v !== 'string') throw new MalformedEvent(`${name}: expected string or null`);
  return v;
}

function optionalEpochMs(obj, name) {
  const v = obj[name];
  if (v === undefined || v === null) return null;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || v > MAX_EPOCH_MS) {
    throw new MalformedEvent(`${name}: expected epoch milliseconds or null`);
  }
  return v;
}

function fieldValue(fields, name) {
  // ioredis gives entry fields as a flat [name, value, ...] array; null for a deleted entry.
  for (let i = 0; i + 1 < fields.length; i += 2) if (fields[i] === name) return fields[i + 1];
  return undefined;
}

/**
 * Decode one entry's fields into a normalized event, or throw MalformedEvent.
 *
 * The event keeps the contract's names; `output` becomes JSON text (or null) ready for a jsonb
 * parameter, and `terminal` says whether the status ends the row's life.
 */
function decodeEntry(fields) {
  if (!Array.isArray(fields)) {
    throw new MalformedEvent('entry has no fields (deleted from the stream)');
  }
  const raw = fieldValue(fields, 'event');
  if (typeof raw !== 'string') throw new MalformedEvent('entry has no `event` field');
  let parsed;
  try {
    parsed = JSON.parse(raw);
  } catch {
    throw new MalformedEvent('event: invalid JSON');
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new MalformedEvent('event: expected a JSON object');
  }
  const obj = clean(parsed);

  const kind = obj.kind;
  if (kind !== 'run' && kind !== 'step') throw new MalformedEvent('kind: expected "run" or "step"');
  if (!Number.isSafeInteger(obj.seq) || obj.seq < 1) {
    throw new MalformedEvent('seq: expected integer >= 1');
  }

  const event = {
    kind,
    seq: obj.seq,
    workflowRunId: requiredString(obj, 'workflowRunId'),
    tenantId: optionalString(obj, 'tenantId'),
    workflowVersionId: optionalString(obj, 'workflowVersionId'),
    jobId: optionalString(obj, 'jobId'),
    status: requiredString(obj, 'status'),
    at: optionalEpochMs(obj, 'at'),
    startedAt: optionalEpochMs(obj, 'startedAt'),
    finishedAt: optionalEpochMs(obj, 'finishedAt'),
    output: obj.output === undefined || obj.output === null ? null : JSON.stringify(obj.output),
    errorCode: optionalString(obj, 'errorCode'),
    errorMessage: optionalString(obj, 'errorMessage'),
    stepKey: null,
    stepRunId: null,
    attempt: null,
    terminal: false,
  };
  if (kind === 'step') {
    event.stepKey = requiredString(obj, 'stepKey');
    event.stepRunId = requiredString(obj, 'stepRunId');
    const attempt = obj.attempt;
    if (attempt !== undefined && attempt !== null) {
      if (!Number.isSafeInteger(attempt) || attempt < 0 || attempt > MAX_INT4) {
        throw new MalformedEvent('attempt: expected integer or null');
      }
      event.attempt = attempt;
    }
    event.terminal = STEP_STATUSES_TERMINAL.has(event.status);
  } else {
    event.terminal = RUN_STATUSES_TERMINAL.has(event.status);
  }
  // A terminal event is the moment the row finished; `at` says when if finishedAt was left out.
  if (event.terminal && event.finishedAt === null) event.finishedAt = event.at;
  return event;
}

module.exports = {
  decodeEntry,
  MalformedEvent,
  RUN_STATUSES_TERMINAL,
  STEP_STATUSES_TERMINAL,
};
