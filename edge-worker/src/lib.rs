//! rollgate-proxy on Cloudflare Workers (filled in by the edge-worker issue).
