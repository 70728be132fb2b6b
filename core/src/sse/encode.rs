//! SSE encoding (filled in by the core work)
