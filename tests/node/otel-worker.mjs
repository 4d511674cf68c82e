// A Node BullMQ Worker instrumented with `bullmq-otel` (spans and metrics), exporting over
// OTLP/HTTP protobuf: what an operator's dashboards for Node workers are built on, for a test to
// put beside the runner's telemetry in one receiver.
//
//   node otel-worker.mjs SPEC.json   (- for stdin)
//
// SPEC: {redis, prefix, queue, endpoint (OTLP base URL), serviceName, workerName, count}
// Processes `count` jobs (a job whose data has `fail: true` throws), then flushes both signals
// and prints one JSON line: {processed, failed}.
import { readFileSync } from 'node:fs';
import { metrics } from '@opentelemetry/api';
import { OTLPMetricExporter } from '@opentelemetry/exporter-metrics-otlp-proto';
import { OTLPTraceExporter } from '@opentelemetry/exporter-trace-otlp-proto';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { MeterProvider, PeriodicExportingMetricReader } from '@opentelemetry/sdk-metrics';
import { BatchSpanProcessor, NodeTracerProvider } from '@opentelemetry/sdk-trace-node';
import { Worker } from 'bullmq';
import { BullMQOtel } from 'bullmq-otel';
import IORedis from 'ioredis';

const [specPath] = process.argv.slice(2);
const spec = JSON.parse(readFileSync(specPath === '-' || !specPath ? 0 : specPath, 'utf8'));
const resource = resourceFromAttributes({ 'service.name': spec.serviceName ?? 'node-worker' });

const tracerProvider = new NodeTracerProvider({
  resource,
  spanProcessors: [
    new BatchSpanProcessor(new OTLPTraceExporter({ url: `${spec.endpoint}/v1/traces` })),
  ],
});
tracerProvider.register();
const meterProvider = new MeterProvider({
  resource,
  readers: [
    new PeriodicExportingMetricReader({
      exporter: new OTLPMetricExporter({ url: `${spec.endpoint}/v1/metrics` }),
      // One export, at shutdown: the test reads complete numbers.
      exportIntervalMillis: 600_000,
    }),
  ],
});
metrics.setGlobalMeterProvider(meterProvider);

const connection = new IORedis(spec.redis ?? 'redis://127.0.0.1:6379/0', { maxRetriesPerRequest: null });
let processed = 0;
let failed = 0;
let finish;
const done = new Promise((resolve) => (finish = resolve));
const count = spec.count ?? 1;
const worker = new Worker(
  spec.queue,
  async (job) => {
    if (job.data?.fail) throw new Error('asked to fail');
    return { ok: true };
  },
  {
    connection,
    prefix: spec.prefix ?? 'bull',
    name: spec.workerName ?? 'node-worker',
    telemetry: new BullMQOtel({ tracerName: 'node-worker', enableMetrics: true }),
  },
);
const settle = () => {
  if (processed + failed >= count) finish();
};
worker.on('completed', () => {
  processed += 1;
  settle();
});
worker.on('failed', () => {
  failed += 1;
  settle();
});
const timer = setTimeout(() => finish(), spec.timeoutMs ?? 30_000);
await done;
clearTimeout(timer);
await worker.close();
await connection.quit();
await tracerProvider.forceFlush();
await meterProvider.forceFlush();
await tracerProvider.shutdown();
await meterProvider.shutdown();
process.stdout.write(JSON.stringify({ processed, failed }) + '\n');
