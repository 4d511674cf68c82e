-- Tables the status sink writes (CONTRACT.md section 6). Applied by the sink at start;
-- every statement is idempotent, so applying it again changes nothing.
--
-- last_seq is the highest event seq applied to the row. The runner's seq rises strictly within a
-- run across run and step events, so an upsert guarded by last_seq makes a duplicate or a late
-- event a no-op. Rows hold only what the events carry: no CHECK constraints, so no event the sink
-- accepted can make a batch fail for ever.

CREATE TABLE IF NOT EXISTS workflow_runs (
    id                  text        PRIMARY KEY,          -- workflowRunId: the run id ("Run identity")
    tenant_id           text,
    workflow_version_id text,
    job_id              text,
    status              text        NOT NULL,             -- QUEUED RUNNING SUCCESS FAILED CANCELED
    started_at          timestamptz,                      -- the run's first start
    finished_at         timestamptz,
    error_code          text,
    error_message       text,
    output              jsonb,
    last_seq            bigint      NOT NULL DEFAULT 0,   -- 0: placeholder made by a step event
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS workflow_runs_tenant_idx ON workflow_runs (tenant_id, started_at);

CREATE TABLE IF NOT EXISTS step_runs (
    id              text        PRIMARY KEY,              -- stepRunId = {workflowRunId}:{stepKey}
    workflow_run_id text        NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    step_key        text        NOT NULL,
    status          text        NOT NULL,                 -- RUNNING SUCCESS FAILED SKIPPED CANCELED
    attempt         integer,
    started_at      timestamptz,                          -- the step's first start
    finished_at     timestamptz,
    output          jsonb,
    error_code      text,
    error_message   text,
    last_seq        bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS step_runs_workflow_run_idx ON step_runs (workflow_run_id);
