'use strict';
/**
 * The PostgreSQL side: the schema, and one batch of events written in one transaction.
 *
 * A batch is folded to one change per row (merge.js), then written with a few multi-row
 * statements: the run upsert, the placeholder runs that step rows need, the step upsert, and
 * the "earlier start" fill of both tables. The SQL applies the merge rules of merge.js against
 * the stored row:
 * - the change is applied only if its seq is above the row's last_seq (a replay or a late
 *   event is a no-op, so the final row does not depend on delivery order or repetition);
 * - started_at is LEAST(stored, new) (LEAST ignores NULL), and a change that lost the seq guard
 *   may still bring an earlier start, nothing else;
 * - a terminal status sets output, error_code and error_message as a whole; otherwise each
 *   keeps its stored value unless the change carries one (COALESCE);
 * - a placeholder run row (status RUNNING, last_seq 0) is inserted for a step whose run has no
 *   row yet, never over a real row; the first run event overwrites it.
 * Every statement changes a row only when something changes, so a replay leaves updated_at.
 */
const fs = require('node:fs');
const path = require('node:path');
const { RUN_STATUSES_TERMINAL, STEP_STATUSES_TERMINAL } = require('./events');
const { foldBatch } = require('./merge');

const SCHEMA_PATH = path.join(__dirname, '..', 'schema.sql');

// Serializes concurrent sinks applying the schema: CREATE TABLE IF NOT EXISTS can race.
const SCHEMA_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('status-sink:schema'))";

const ts = (column) => `to_timestamp(${column} / 1000)`;
const sqlTextArray = (set) => `'{${[...set].join(',')}}'::text[]`;

/** The outcome columns: replaced by a terminal status, otherwise kept unless given. */
function outcomeSet(terminalStatuses) {
  const terminal = `EXCLUDED.status = ANY(${sqlTextArray(terminalStatuses)})`;
  return ['output', 'error_code', 'error_message']
    .map(
      (c) =>
        `${c} = CASE WHEN ${terminal} THEN EXCLUDED.${c} ELSE COALESCE(EXCLUDED.${c}, t.${c}) END`,
    )
    .join(',\n    ');
}

const UPSERT_RUNS = `
INSERT INTO workflow_runs AS t
    (id, tenant_id, workflow_version_id, job_id, status, started_at, finished_at,
     error_code, error_message, output, last_seq, updated_at)
SELECT u.id, u.tenant_id, u.workflow_version_id, u.job_id, u.status, ${ts('u.started_ms')},
       ${ts('u.finished_ms')}, u.error_code, u.error_message, u.output::jsonb, u.last_seq, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::float8[],
            $7::float8[], $8::text[], $9::text[], $10::text[], $11::bigint[])
     AS u(id, tenant_id, workflow_version_id, job_id, status, started_ms, finished_ms,
          error_code, error_message, output, last_seq)
ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET
    tenant_id = COALESCE(EXCLUDED.tenant_id, t.tenant_id),
    workflow_version_id = COALESCE(EXCLUDED.workflow_version_id, t.workflow_version_id),
    job_id = COALESCE(EXCLUDED.job_id, t.job_id),
    status = EXCLUDED.status,
    started_at = LEAST(EXCLUDED.started_at, t.started_at),
    finished_at = COALESCE(EXCLUDED.finished_at, t.finished_at),
    ${outcomeSet(RUN_STATUSES_TERMINAL)},
    last_seq = EXCLUDED.last_seq,
    updated_at = now()
WHERE t.last_seq < EXCLUDED.last_seq`;

const INSERT_PLACEHOLDER_RUNS = `
INSERT INTO workflow_runs (id, tenant_id, workflow_version_id, job_id, status, last_seq)
SELECT u.id, u.tenant_id, u.workflow_version_id, u.job_id, 'RUNNING', 0
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     AS u(id, tenant_id, workflow_version_id, job_id)
ORDER BY u.id
ON CONFLICT (id) DO NOTHING`;

const UPSERT_STEPS = `
INSERT INTO step_runs AS t
    (id, workflow_run_id, step_key, status, attempt, started_at, finished_at,
     output, error_code, error_message, last_seq, updated_at)
SELECT u.id, u.workflow_run_id, u.step_key, u.status, u.attempt, ${ts('u.started_ms')},
       ${ts('u.finished_ms')}, u.output::jsonb, u.error_code, u.error_message, u.last_seq, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::float8[],
            $7::float8[], $8::text[], $9::text[], $10::text[], $11::bigint[])
     AS u(id, workflow_run_id, step_key, status, attempt, started_ms, finished_ms,
          output, error_code, error_message, last_seq)
ORDER BY u.id
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status,
    attempt = COALESCE(EXCLUDED.attempt, t.attempt),
    started_at = LEAST(EXCLUDED.started_at, t.started_at),
    finished_at = COALESCE(EXCLUDED.finished_at, t.finished_at),
    ${outcomeSet(STEP_STATUSES_TERMINAL)},
    last_seq = EXCLUDED.last_seq,
    updated_at = now()
WHERE t.last_seq < EXCLUDED.last_seq`;

// After the upsert, which locked every row it met: an earlier start than the stored one is
// taken even from a change that lost the seq guard. A no-op for the rows the upsert wrote.
const fillStartSql = (table) => `
UPDATE ${table} AS t SET started_at = ${ts('u.started_ms')}, updated_at = now()
FROM unnest($1::text[], $2::float8[]) AS u(id, started_ms)
WHERE t.id = u.id AND (t.started_at IS NULL OR t.started_at > ${ts('u.started_ms')})`;
const FILL_RUN_STARTS = fillStartSql('workflow_runs');
const FILL_STEP_STARTS = fillStartSql('step_runs');

/**
 * SQLSTATE classes that an event's content can cause (data exception, integrity constraint,
 * program limit). Anything else (connection lost, shutdown, deadlock, ...) is the database's
 * state, and the batch is retried as it is.
 */
function isContentError(err) {
  return typeof err?.code === 'string' && /^(22|23|54)/.test(err.code);
}

/**
 * Run fn(client) inside BEGIN/COMMIT on a pooled client. On any error the transaction is rolled
 * back and the connection discarded: after a failure it may be half-dead, and a new one is cheap.
 */
async function inTransaction(pool, fn) {
  const client = await pool.connect();
  // A checked-out client whose server goes away between queries emits 'error'; unheard, that
  // event would kill the process. The next query then fails, and the batch is retried.
  const onError = () => {};
  client.on('error', onError);
  try {
    await client.query('BEGIN');
    const result = await fn(client);
    await client.query('COMMIT');
    client.off('error', onError);
    client.release();
    return result;
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    // The listener stays: a discarded client may still report its socket's end.
    client.release(true);
    throw err;
  }
}

async function applySchema(pool) {
  const ddl = fs.readFileSync(SCHEMA_PATH, 'utf8');
  await inTransaction(pool, async (client) => {
    await client.query(SCHEMA_LOCK_SQL);
    await client.query(ddl);
  });
}

const column = (rows, pick) => rows.map(pick);

async function fillStarts(client, sqlText, rows) {
  const started = rows.filter((r) => r.startedAt !== null);
  if (started.length === 0) return 0;
  const res = await client.query(sqlText, [
    column(started, (r) => r.id),
    column(started, (r) => r.startedAt),
  ]);
  return res.rowCount;
}

/**
 * Write decoded events in one transaction. Resolves with the number of row writes once COMMIT
 * succeeded (0 for a pure replay); rejects with the database error otherwise, and then nothing
 * of the batch is stored.
 */
async function writeBatch(pool, events) {
  const { runs, steps, placeholders } = foldBatch(events);
  return inTransaction(pool, async (client) => {
    let written = 0;
    if (runs.length > 0) {
      const res = await client.query(UPSERT_RUNS, [
        column(runs, (r) => r.id),
        column(runs, (r) => r.tenantId),
        column(runs, (r) => r.workflowVersionId),
        column(runs, (r) => r.jobId),
        column(runs, (r) => r.status),
        column(runs, (r) => r.startedAt),
        column(runs, (r) => r.finishedAt),
        column(runs, (r) => r.errorCode),
        column(runs, (r) => r.errorMessage),
        column(runs, (r) => r.output),
        column(runs, (r) => r.seq),
      ]);
      written += res.rowCount;
      written += await fillStarts(client, FILL_RUN_STARTS, runs);
    }
    if (steps.length > 0) {
      const res = await client.query(INSERT_PLACEHOLDER_RUNS, [
        column(placeholders, (r) => r.id),
        column(placeholders, (r) => r.tenantId),
        column(placeholders, (r) => r.workflowVersionId),
        column(placeholders, (r) => r.jobId),
      ]);
      written += res.rowCount;
      const stepRes = await client.query(UPSERT_STEPS, [
        column(steps, (r) => r.id),
        column(steps, (r) => r.workflowRunId),
        column(steps, (r) => r.stepKey),
        column(steps, (r) => r.status),
        column(steps, (r) => r.attempt),
        column(steps, (r) => r.startedAt),
        column(steps, (r) => r.finishedAt),
        column(steps, (r) => r.output),
        column(steps, (r) => r.errorCode),
        column(steps, (r) => r.errorMessage),
        column(steps, (r) => r.seq),
      ]);
      written += stepRes.rowCount;
      written += await fillStarts(client, FILL_STEP_STARTS, steps);
    }
    return written;
  });
}

module.exports = { applySchema, writeBatch, isContentError, SCHEMA_PATH };
