// rollgate-proxy demo page: every flag with its state, live over server-sent events (falling back
// to polling), the connection state, the proxy's data age and health, and per-user evaluation.
// Uses the proxy's own client library, served beside this file. Optional page parameters:
// ?token=<client key>  ?user_id=<id>. With several environments the page can be opened under
// /env/<name>/ and offers to switch; the proxy decides whether the page's key may (401 if not).

import { createClient } from './rollgate-proxy-client.js';

const HEALTH_EVERY_MS = 10_000;
const STATE_LABELS = {
  connecting: 'Connecting…',
  streaming: 'Live · streaming',
  polling: 'Polling',
  error: 'Error',
  closed: 'Closed',
};

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const els = {
  state: $('connection-state'),
  stateLabel: /** @type {HTMLElement} */ ($('connection-state').querySelector('.label')),
  age: $('data-age'),
  lastUpdate: $('last-update'),
  health: $('health'),
  healthFields: $('health-fields'),
  user: $('current-user'),
  userForm: /** @type {HTMLFormElement} */ ($('user-form')),
  userInput: /** @type {HTMLInputElement} */ ($('user-id')),
  userClear: $('user-clear'),
  error: $('error'),
  list: $('flags'),
  count: $('flag-count'),
  empty: $('flags-empty'),
  filter: /** @type {HTMLInputElement} */ ($('flag-filter')),
  announcer: $('announcer'),
  envSwitch: $('env-switch'),
  envSelect: /** @type {HTMLSelectElement} */ ($('env-select')),
};

// Same origin, and whatever path prefix the page is served under.
const base = new URL('.', location.href).pathname.replace(/\/+$/, '');
// Opened under /env/<name>/: that environment, and the root the other ones hang off.
const envMatch = base.match(/^(.*)\/env\/([a-z0-9][a-z0-9_-]*)$/);
const root = envMatch ? envMatch[1] : base;
const currentEnv = envMatch ? envMatch[2] : undefined;
const pageParams = new URLSearchParams(location.search);
const token = pageParams.get('token') || undefined;
const initialUser = pageParams.get('user_id') || '';

els.userInput.value = initialUser;
const client = createClient({
  url: base,
  mode: 'stream',
  clientKey: token,
  context: initialUser ? { id: initialUser } : undefined,
});

// ---- flags ----

let firstRender = true;

/** @param {Readonly<Record<string, boolean>>} flags @param {readonly string[]} changed */
function renderFlags(flags, changed) {
  const keys = Object.keys(flags).sort((a, b) => a.localeCompare(b));
  /** @type {Map<string, HTMLLIElement>} */
  const rows = new Map();
  for (const row of /** @type {NodeListOf<HTMLLIElement>} */ (els.list.querySelectorAll('li[data-flag]'))) {
    rows.set(row.dataset.flag ?? '', row);
  }
  for (const [key, row] of rows) {
    if (!(key in flags)) row.remove();
  }
  let previous = /** @type {HTMLLIElement | null} */ (null);
  for (const key of keys) {
    let row = rows.get(key);
    if (!row) {
      row = flagRow(key);
      rows.set(key, row);
    }
    setRow(row, flags[key]);
    // Keep alphabetical order without rebuilding rows (so the flash animation survives).
    const wanted = previous ? previous.nextElementSibling : els.list.firstElementChild;
    if (wanted !== row) els.list.insertBefore(row, wanted);
    previous = row;
  }
  if (!firstRender) {
    for (const key of changed) {
      const row = rows.get(key);
      if (row && key in flags) flash(row);
    }
    announce(changed, flags);
  }
  firstRender = false;
  els.count.textContent = String(keys.length);
  els.empty.hidden = keys.length > 0;
  els.empty.textContent = 'No flags defined.';
  applyFilter();
}

/** @param {string} key */
function flagRow(key) {
  const row = document.createElement('li');
  row.className = 'flag';
  row.dataset.flag = key;
  const name = document.createElement('code');
  name.className = 'flag-key';
  name.textContent = key;
  const value = document.createElement('span');
  value.className = 'flag-value';
  const track = document.createElement('span');
  track.className = 'switch';
  track.setAttribute('aria-hidden', 'true');
  const text = document.createElement('span');
  text.className = 'flag-text';
  value.append(track, text);
  row.append(name, value);
  return row;
}

/** @param {HTMLLIElement} row @param {boolean} enabled */
function setRow(row, enabled) {
  row.dataset.enabled = String(enabled);
  const text = /** @type {HTMLElement} */ (row.querySelector('.flag-text'));
  text.textContent = enabled ? 'On' : 'Off';
}

/** @param {Element} row */
function flash(row) {
  row.classList.remove('flash');
  // Force a reflow so the animation restarts when a flag flips twice in a row.
  void (/** @type {HTMLElement} */ (row).offsetWidth);
  row.classList.add('flash');
}

/** @param {readonly string[]} changed @param {Readonly<Record<string, boolean>>} flags */
function announce(changed, flags) {
  if (changed.length === 0) return;
  const parts = changed.slice(0, 5).map((key) => (key in flags ? `${key} turned ${flags[key] ? 'on' : 'off'}` : `${key} removed`));
  if (changed.length > 5) parts.push(`and ${changed.length - 5} more`);
  els.announcer.textContent = parts.join(', ');
}

function applyFilter() {
  const needle = els.filter.value.trim().toLowerCase();
  for (const row of /** @type {NodeListOf<HTMLLIElement>} */ (els.list.querySelectorAll('li[data-flag]'))) {
    row.hidden = needle !== '' && !(row.dataset.flag ?? '').toLowerCase().includes(needle);
  }
}

els.filter.addEventListener('input', applyFilter);
client.subscribe(renderFlags);
// The first answer may be an empty flag set, which is not a change: render it anyway.
client.ready.then((loaded) => {
  if (loaded) renderFlags(client.getAll(), []);
});

// ---- connection state and errors ----

/** @param {string} state */
function renderState(state) {
  const shown = state === 'open' ? 'streaming' : state;
  els.state.dataset.state = shown;
  els.stateLabel.textContent = STATE_LABELS[/** @type {keyof typeof STATE_LABELS} */ (shown)] ?? shown;
  const error = client.lastError();
  if (state === 'error' && error) {
    const hint =
      error.status === 401
        ? token
          ? ' The client key in this page’s ?token= was refused.'
          : ' This proxy needs a client key: add ?token=<client key> to this page’s address.'
        : ' Showing the last flags received; retrying.';
    els.error.textContent = `Cannot load flags (${error.code}): ${error.message}.${hint}`;
    els.error.hidden = false;
  } else {
    els.error.hidden = true;
    els.error.textContent = '';
  }
}

client.onStateChange((state) => renderState(state));
renderState(client.state());

// ---- per-user evaluation ----

/** @param {string} id */
async function evaluateFor(id) {
  els.user.textContent = id || 'anonymous';
  els.user.dataset.user = id;
  const url = new URL(location.href);
  if (id) url.searchParams.set('user_id', id);
  else url.searchParams.delete('user_id');
  history.replaceState(null, '', url);
  await client.setContext(id ? { id } : undefined);
}

els.user.textContent = initialUser || 'anonymous';
els.user.dataset.user = initialUser;
els.userForm.addEventListener('submit', (event) => {
  event.preventDefault();
  void evaluateFor(els.userInput.value.trim());
});
els.userClear.addEventListener('click', () => {
  els.userInput.value = '';
  void evaluateFor('');
  els.userInput.focus();
});

// ---- health and data age ----

/** @type {{ ageMs: number, at: number } | null} */
let proxyAge = null;

async function refreshHealth() {
  /** @type {Record<string, string>} */
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const response = await fetch(`${base}/api/health`, { headers, cache: 'no-store' });
    const body = await response.json();
    renderHealth(body && typeof body === 'object' ? body : {});
  } catch {
    els.health.dataset.status = 'unreachable';
    els.health.textContent = 'unreachable';
    proxyAge = null;
  }
}

/** @param {Record<string, unknown>} all */
function renderEnvironments(all) {
  const envs = all.environments;
  if (!envs || typeof envs !== 'object' || Array.isArray(envs)) return all;
  const names = Object.keys(envs);
  if (els.envSelect.options.length !== names.length) {
    els.envSelect.replaceChildren(...names.map((name) => new Option(name, name)));
  }
  els.envSelect.value = currentEnv && names.includes(currentEnv) ? currentEnv : names[0] ?? '';
  els.envSwitch.hidden = names.length < 2 && !currentEnv;
  const own = /** @type {Record<string, unknown>} */ (envs)[els.envSelect.value];
  return own && typeof own === 'object' ? /** @type {Record<string, unknown>} */ (own) : all;
}

els.envSelect.addEventListener('change', () => {
  location.href = `${root}/env/${encodeURIComponent(els.envSelect.value)}/${location.search}`;
});

/** @param {Record<string, unknown>} all */
function renderHealth(all) {
  // Several environments: the figures of the one this page shows, every one in the details.
  const health = renderEnvironments(all);
  const status = typeof health.status === 'string' ? health.status : 'unknown';
  els.health.dataset.status = status;
  els.health.textContent = typeof health.circuit === 'string' ? `${status} · circuit ${health.circuit.replace('_', '-')}` : status;
  proxyAge = typeof health.dataAgeMs === 'number' && Number.isFinite(health.dataAgeMs) ? { ageMs: health.dataAgeMs, at: Date.now() } : null;
  els.healthFields.replaceChildren(...flatten(all).flatMap(([name, value]) => {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value;
    return [dt, dd];
  }));
  tick();
}

/**
 * Turn nested health JSON into `a.b: value` rows, whatever fields the proxy adds.
 * @param {unknown} value
 * @param {string} [prefix]
 * @returns {[string, string][]}
 */
function flatten(value, prefix = '') {
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    return Object.entries(value).flatMap(([key, inner]) => flatten(inner, prefix ? `${prefix}.${key}` : key));
  }
  return [[prefix || 'value', typeof value === 'string' ? value : JSON.stringify(value)]];
}

/** @param {number} ms */
function formatAge(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${String(m % 60).padStart(2, '0')}m`;
  return `${Math.floor(h / 24)}d`;
}

function tick() {
  const now = Date.now();
  // Prefer the proxy's own data age (health); without it, the time since this page heard from it.
  const updated = client.lastUpdated();
  const ageMs = proxyAge ? proxyAge.ageMs + (now - proxyAge.at) : updated ? now - updated.getTime() : null;
  els.age.dataset.ageMs = ageMs === null ? '' : String(Math.round(ageMs));
  els.age.dataset.source = proxyAge ? 'proxy' : 'client';
  els.age.textContent = ageMs === null ? '—' : formatAge(ageMs);
  els.lastUpdate.textContent = updated ? `${formatAge(now - updated.getTime())} ago` : '—';
  if (updated) els.lastUpdate.title = updated.toISOString();
}

// A changed flag means the proxy just got new data: refresh its age right away.
client.subscribe(() => void refreshHealth());
client.ready.then(() => tick());
void refreshHealth();
const timers = [setInterval(() => void refreshHealth(), HEALTH_EVERY_MS), setInterval(tick, 1_000)];
tick();

// A handle for browser tests and the console: the client, and a way to stop everything.
Object.assign(globalThis, {
  rollgateDemo: {
    client,
    stop() {
      for (const timer of timers) clearInterval(timer);
      client.close();
    },
  },
});
