'use strict';
/**
 * The loop: read entries from the consumer group, write them to PostgreSQL, ack them.
 *
 * Order of work: this consumer's own pending entries first (id 0: a previous life of the same
 * CONSUMER_NAME read them and did not ack), then new entries ('>'), and every so often the
 * entries of any consumer idle longer than CLAIM_IDLE_MS (XAUTOCLAIM: a dead consumer's work).
 *
 * Guarantees: an entry is acked only after the transaction holding its event committed, so a
 * crash at any point leaves it pending and it is written again (the upserts make that a no-op).
 * A database failure retries the same batch with backoff, for ever, without acking; an event
 * PostgreSQL refuses for its content is isolated, logged, acked and counted like a malformed one.
 */
const { log, describeError } = require('./log');
const { decodeEntry, MalformedEvent } = require('./events');
const { writeBatch, applySchema, isContentError } = require('./store');

const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 5000;

/** Delay before retry number `attempt` (1-based): exponential, capped, with half jitter. */
function backoffMs(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt - 1, 16));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

class Abandoned extends Error {}

class StatusSink {
  constructor({ config, redis, pool }) {
    this.config = config;
    this.redis = redis;
    this.pool = pool;
    this.stopping = false;
    this.stopDeadline = Infinity;
    this.wakeUp = null;
    this.counts = { entries: 0, rowsWritten: 0, malformed: 0, batches: 0, dbRetries: 0 };
    // Claim often enough that a dead consumer's entries wait about CLAIM_IDLE_MS, not twice that.
    this.claimEveryMs = Math.max(100, Math.min(Math.floor(config.claimIdleMs / 2), 10000));
    this.blockMs = Math.min(config.blockMs, this.claimEveryMs);
  }

  /** Ask the loop to finish the batch in hand and return; gives up retrying after graceMs. */
  stop(graceMs) {
    if (this.stopping) return;
    this.stopping = true;
    this.stopDeadline = Date.now() + graceMs;
    if (this.wakeUp) this.wakeUp();
  }

  async sleep(ms) {
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wakeUp = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.wakeUp = null;
  }

  /** Retry fn until it resolves; backs off between tries; Abandoned once stopping has timed out. */
  async retrying(what, fn, onError) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await fn();
      } catch (err) {
        if (onError) await onError(err);
        if (this.stopping && Date.now() >= this.stopDeadline) throw new Abandoned(what);
        const delayMs = backoffMs(attempt);
        log('warn', `${what}_retry`, { attempt, delayMs, ...describeError(err) });
        await this.sleep(this.stopping ? Math.min(delayMs, 250) : delayMs);
      }
    }
  }

  async ensureGroup() {
    const { stream, group } = this.config;
    try {
      await this.redis.xgroup('CREATE', stream, group, '0', 'MKSTREAM');
      log('info', 'group_created', { stream, group });
    } catch (err) {
      if (!String(err.message).startsWith('BUSYGROUP')) throw err;
    }
  }

  async start() {
    await this.retrying('schema', () => applySchema(this.pool));
    await this.retrying('group', () => this.ensureGroup());
    log('info', 'started', {
      stream: this.config.stream,
      group: this.config.group,
      consumer: this.config.consumer,
      batchSize: this.config.batchSize,
      claimIdleMs: this.config.claimIdleMs,
    });
  }

  /** Run until stop(); resolves true when every entry read was acked, false if work was left. */
  async run() {
    try {
      await this.drainOwnPending();
      let nextClaimAt = Date.now();
      while (!this.stopping) {
        if (Date.now() >= nextClaimAt) {
          await this.claimIdle();
          nextClaimAt = Date.now() + this.claimEveryMs;
        }
        if (this.stopping) break;
        const entries = await this.redisCall('read', () => this.readGroup('>', this.blockMs));
        if (entries.length > 0) await this.handle(entries, 'new');
      }
      return true;
    } catch (err) {
      if (err instanceof Abandoned) {
        log('warn', 'shutdown_left_pending', { during: err.message });
        return false;
      }
      throw err;
    } finally {
      log('info', 'stopped', { consumer: this.config.consumer, ...this.counts });
    }
  }

  /** A Redis call retried across outages; a lost group (stream deleted) is recreated. */
  redisCall(what, fn) {
    return this.retrying(`redis_${what}`, fn, async (err) => {
      if (String(err?.message).startsWith('NOGROUP')) {
        await this.ensureGroup().catch(() => {});
      }
    });
  }

  async readGroup(id, blockMs) {
    const { stream, group, consumer, batchSize } = this.config;
    const args = ['GROUP', group, consumer, 'COUNT', batchSize];
    if (blockMs !== null) args.push('BLOCK', blockMs);
    args.push('STREAMS', stream, id);
    const reply = await this.redis.xreadgroup(...args);
    // Reply: [[stream, [[id, fields], ...]]], or null when BLOCK timed out.
    return reply && reply.length > 0 ? reply[0][1] : [];
  }

  async drainOwnPending() {
    let after = '0';
    while (!this.stopping) {
      const entries = await this.redisCall('read_pending', () => this.readGroup(after, null));
      if (entries.length === 0) return;
      await this.handle(entries, 'pending');
      after = entries[entries.length - 1][0];
    }
  }

  async claimIdle() {
    const { stream, group, consumer, claimIdleMs, batchSize } = this.config;
    let cursor = '0-0';
    do {
      const reply = await this.redisCall('claim', () =>
        this.redis.xautoclaim(stream, group, consumer, claimIdleMs, cursor, 'COUNT', batchSize),
      );
      // Reply: [nextCursor, entries, deletedIds]; deleted ids leave the PEL by themselves.
      const [next, entries, deleted] = reply;
      if (deleted && deleted.length > 0) {
        log('warn', 'claimed_deleted', { count: deleted.length });
      }
      if (entries.length > 0) await this.handle(entries, 'claimed');
      cursor = next;
    } while (cursor !== '0-0' && !this.stopping);
  }

  /** One batch: decode, write in one transaction, then ack every entry (malformed ones too). */
  async handle(entries, source) {
    const started = Date.now();
    const events = [];
    let malformed = 0;
    for (const [id, fields] of entries) {
      try {
        events.push({ ...decodeEntry(fields), entryId: id });
      } catch (err) {
        malformed += 1;
        const reason =
          err instanceof MalformedEvent ? err.message : `decode failed: ${err.message}`;
        log('warn', 'malformed_entry', { entryId: id, source, reason });
      }
    }
    let rowsWritten = 0;
    let rejected = 0;
    if (events.length > 0) ({ rowsWritten, rejected } = await this.write(events));
    malformed += rejected;

    const ids = entries.map(([id]) => id);
    const { stream, group } = this.config;
    await this.redisCall('ack', () => this.redis.xack(stream, group, ...ids));

    this.counts.entries += entries.length;
    this.counts.rowsWritten += rowsWritten;
    this.counts.malformed += malformed;
    this.counts.batches += 1;
    log('info', 'batch_committed', {
      source,
      entries: entries.length,
      rowsWritten,
      malformed,
      firstId: ids[0],
      lastId: ids[ids.length - 1],
      durationMs: Date.now() - started,
      totalMalformed: this.counts.malformed,
    });
  }

  /** Write the batch; on an error caused by content, write event by event to find the culprit. */
  async write(events) {
    let contentError = null;
    const rowsWritten = await this.retrying('db_write', async () => {
      try {
        return await writeBatch(this.pool, events);
      } catch (err) {
        if (isContentError(err)) {
          contentError = err;
          return null;
        }
        this.counts.dbRetries += 1;
        throw err;
      }
    }, (err) => this.reapplySchemaIfMissing(err));
    if (contentError === null) return { rowsWritten, rejected: 0 };

    log('warn', 'batch_isolating', { events: events.length, ...describeError(contentError) });
    let total = 0;
    let rejected = 0;
    for (const event of events) {
      const one = await this.retrying('db_write', async () => {
        try {
          return { rowsWritten: await writeBatch(this.pool, [event]) };
        } catch (err) {
          if (isContentError(err)) return { rejectedBy: err };
          throw err;
        }
      }, (err) => this.reapplySchemaIfMissing(err));
      if (one.rejectedBy) {
        rejected += 1;
        log('warn', 'malformed_entry', {
          entryId: event.entryId,
          reason: 'rejected by PostgreSQL',
          ...describeError(one.rejectedBy),
        });
      } else {
        total += one.rowsWritten;
      }
    }
    return { rowsWritten: total, rejected };
  }

  async reapplySchemaIfMissing(err) {
    // 42P01: undefined table (dropped while we ran); without it every retry would fail the same.
    if (err?.code === '42P01') await applySchema(this.pool).catch(() => {});
  }
}

module.exports = { StatusSink, backoffMs };
