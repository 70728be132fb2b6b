// The original proxy pattern (the vendor's "Proxy Pattern" page), as the baseline for
// bench/run.sh: Express + cors + express.json(), one upstream SSE connection, the same routes
// and handlers written as on that page. The vendor's `@rollgate/sdk-node` is not on npm, so
// `RollgateClient` below is the smallest stand-in with the same surface (init, getAllFlags,
// isEnabled, 'flags-updated'): it fetches /api/v1/sdk/flags and follows /api/v1/sdk/stream
// (`init` carries the flags; `flag-changed` means refetch), as the SDK does.
import express from 'express';
import cors from 'cors';
import { EventEmitter } from 'node:events';

class RollgateClient extends EventEmitter {
  constructor({ apiKey, baseUrl }) {
    super();
    this.apiKey = apiKey;
    this.baseUrl = baseUrl;
    this.flags = {};
  }
  async fetchFlags() {
    const res = await fetch(`${this.baseUrl}/api/v1/sdk/flags`, {
      headers: { Authorization: `Bearer ${this.apiKey}` },
    });
    const body = await res.json();
    this.flags = body.flags || {};
    this.emit('flags-updated', this.flags);
  }
  async init() {
    await this.fetchFlags();
    this.stream();
  }
  async stream() {
    try {
      const res = await fetch(`${this.baseUrl}/api/v1/sdk/stream?token=${encodeURIComponent(this.apiKey)}`, {
        headers: { Accept: 'text/event-stream' },
      });
      const decoder = new TextDecoder();
      let buf = '';
      for await (const chunk of res.body) {
        buf += decoder.decode(chunk, { stream: true });
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, end);
          buf = buf.slice(end + 2);
          let event = 'message';
          let data = '';
          for (const line of frame.split('\n')) {
            if (line.startsWith('event:')) event = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (event === 'init' || event === 'flags') {
            try {
              const parsed = JSON.parse(data);
              this.flags = parsed.flags || parsed;
              this.emit('flags-updated', this.flags);
            } catch { /* keep the last good flags */ }
          } else if (event === 'flag-changed' || event === 'flag-update') {
            this.fetchFlags().catch(() => {});
          }
        }
      }
    } catch { /* reconnect below */ }
    setTimeout(() => this.stream(), 1000);
  }
  getAllFlags() { return this.flags; }
  isEnabled(key, fallback) { return key in this.flags ? Boolean(this.flags[key]) : fallback; }
  getCircuitState() { return 'closed'; }
  getCacheStats() { return {}; }
  getPrometheusMetrics() { return ''; }
}

const PORT = process.env.PORT || 3001;
// Single Rollgate connection for all users
const rollgate = new RollgateClient({
  apiKey: process.env.ROLLGATE_API_KEY,
  baseUrl: process.env.ROLLGATE_BASE_URL || 'https://api.rollgate.io',
  enableStreaming: true, // Use SSE for real-time
  refreshInterval: 30000, // Fallback polling
});
const app = express();
app.use(cors());
app.use(express.json());
// Get all flags (cached from SSE)
app.get('/api/flags', (req, res) => {
  res.json({
    flags: rollgate.getAllFlags(),
    _meta: { cachedAt: new Date().toISOString() },
  });
});
// Check single flag
app.get('/api/flags/:key', (req, res) => {
  const enabled = rollgate.isEnabled(req.params.key, false);
  res.json({ key: req.params.key, enabled });
});
// SSE endpoint for real-time updates to clients
const sseClients = new Set();
app.get('/api/stream', (req, res) => {
  res.set({
    'Content-Type': 'text/event-stream',
    'Cache-Control': 'no-cache',
    'Connection': 'keep-alive',
  });
  res.flushHeaders();
  // Send initial flags
  res.write(`event: flags\ndata: ${JSON.stringify(rollgate.getAllFlags())}\n\n`);
  sseClients.add(res);
  req.on('close', () => sseClients.delete(res));
});
// Broadcast updates when flags change
rollgate.on('flags-updated', (flags) => {
  const data = `event: flags\ndata: ${JSON.stringify(flags)}\n\n`;
  sseClients.forEach(client => client.write(data));
});
// Health check with circuit breaker status
app.get('/api/health', (req, res) => {
  const circuitState = rollgate.getCircuitState();
  res.json({
    status: circuitState === 'open' ? 'degraded' : 'healthy',
    circuit: circuitState,
    cache: rollgate.getCacheStats(),
  });
});
// Prometheus metrics
app.get('/api/metrics', (req, res) => {
  res.set('Content-Type', 'text/plain');
  res.send(rollgate.getPrometheusMetrics('rollgate_proxy'));
});
// Start server
async function start() {
  await rollgate.init();
  rollgate.on('flags-updated', (flags) => {
    console.log('[Proxy] Flags updated:', Object.keys(flags).length);
  });
  app.listen(PORT, '127.0.0.1', () => {
    console.log(`[Proxy] Running on port ${PORT}`);
  });
}
start();
