// A control plane that traces: adds workflow_run jobs with Node BullMQ and `bullmq-otel`, so that
// BullMQ writes the W3C trace carrier into the job's opts key `tm` (CONTRACT §2).
//
//   node otel-producer.mjs SPEC.json   (- for stdin)
//
// SPEC: {redis: "redis://...", prefix, queue, jobs: [{name, data, opts}]}
//
// The jobs are added inside one root span, as a control plane adds them while serving a request.
// Prints one JSON line: {traceId, ids, spans: [{name, kind, traceId, spanId, parentSpanId}]},
// the spans this process ended (the root and BullMQ's own producer span per job), so a test can
// check that the runner's spans continue exactly this trace.
import { readFileSync } from 'node:fs';
import { SpanKind, trace } from '@opentelemetry/api';
import {
  InMemorySpanExporter,
  NodeTracerProvider,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-node';
import { Queue } from 'bullmq';
import { BullMQOtel } from 'bullmq-otel';
import IORedis from 'ioredis';

const [specPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(specPath === '-' || !specPath ? 0 : specPath, 'utf8'));

const exporter = new InMemorySpanExporter();
const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
// register() installs the AsyncLocalStorage context manager and the W3C propagators: without them
// the active span is lost across awaits and BullMQ's carrier would be empty.
provider.register();

const connection = new IORedis(spec.redis ?? 'redis://127.0.0.1:6379/0', { maxRetriesPerRequest: null });
const queue = new Queue(spec.queue ?? 'workflow-runs', {
  connection,
  prefix: spec.prefix ?? 'bull',
  telemetry: new BullMQOtel({ tracerName: 'control-plane' }),
});

const tracer = trace.getTracer('control-plane');
let traceId;
const ids = [];
await tracer.startActiveSpan('create workflow runs', { kind: SpanKind.SERVER }, async (root) => {
  traceId = root.spanContext().traceId;
  try {
    for (const job of spec.jobs ?? []) {
      const added = await queue.add(job.name ?? 'workflow_run', job.data, job.opts ?? {});
      ids.push(added.id);
    }
  } finally {
    root.end();
  }
});
await provider.forceFlush();

const spans = exporter.getFinishedSpans().map((span) => ({
  name: span.name,
  kind: SpanKind[span.kind],
  traceId: span.spanContext().traceId,
  spanId: span.spanContext().spanId,
  parentSpanId: span.parentSpanContext?.spanId ?? null,
}));
process.stdout.write(JSON.stringify({ traceId, ids, spans }) + '\n');
await queue.close();
// Queue.close() leaves a connection it was handed open, and an open socket keeps Node alive.
await connection.quit();
await provider.shutdown();
