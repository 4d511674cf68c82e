'use strict';
/**
 * A batch of events folded into one change per row, with no I/O.
 *
 * The fold applies, in JavaScript, the merge rules the upserts in store.js apply in SQL, so a
 * batch costs a handful of statements instead of one per event, and a multi-row
 * `INSERT ... ON CONFLICT` never meets the same id twice. Folding events of a row in seq order
 * and then applying the result gives the row that applying them one by one would give: both
 * are the same merge, and the merge does not depend on order.
 *
 * The rules, per row:
 * - the newest event (highest seq) sets status, last_seq, and attempt if it carries one;
 * - started_at is the earliest start reported;
 * - finished_at, and ids, keep the last value known;
 * - a terminal event sets the outcome (output, errorCode, errorMessage) as a whole; a
 *   non-terminal one keeps the outcome known so far.
 */

function earliest(a, b) {
  if (a === null) return b;
  if (b === null) return a;
  return Math.min(a, b);
}

/** Fold event e (seq not below acc.seq) into acc, the row's changes so far. */
function foldInto(acc, e) {
  if (acc === undefined) return { ...e };
  return {
    ...acc,
    seq: e.seq,
    status: e.status,
    terminal: e.terminal,
    tenantId: e.tenantId ?? acc.tenantId,
    workflowVersionId: e.workflowVersionId ?? acc.workflowVersionId,
    jobId: e.jobId ?? acc.jobId,
    attempt: e.attempt ?? acc.attempt,
    startedAt: earliest(acc.startedAt, e.startedAt),
    finishedAt: e.finishedAt ?? acc.finishedAt,
    output: e.terminal ? e.output : (e.output ?? acc.output),
    errorCode: e.terminal ? e.errorCode : (e.errorCode ?? acc.errorCode),
    errorMessage: e.terminal ? e.errorMessage : (e.errorMessage ?? acc.errorMessage),
  };
}

const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

/**
 * Fold decoded events into { runs, steps, placeholders }, each sorted by row id (a fixed lock
 * order, so two sinks writing the same rows cannot deadlock). placeholders are the run rows
 * that step events need to exist.
 */
function foldBatch(events) {
  const sorted = [...events].sort((a, b) => a.seq - b.seq);
  const runs = new Map();
  const steps = new Map();
  const placeholders = new Map();
  for (const e of sorted) {
    if (e.kind === 'run') {
      runs.set(e.workflowRunId, foldInto(runs.get(e.workflowRunId), e));
    } else {
      steps.set(e.stepRunId, foldInto(steps.get(e.stepRunId), e));
      if (!placeholders.has(e.workflowRunId)) placeholders.set(e.workflowRunId, e);
    }
  }
  const rows = (map, idOf) => [...map.values()].map((r) => ({ ...r, id: idOf(r) })).sort(byId);
  return {
    runs: rows(runs, (r) => r.workflowRunId),
    steps: rows(steps, (r) => r.stepRunId),
    placeholders: rows(placeholders, (r) => r.workflowRunId),
  };
}

module.exports = { foldBatch };
