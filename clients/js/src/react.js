// React bindings for @rollgate-proxy/client: a provider and hooks built on useSyncExternalStore,
// so every component sees the same flag snapshot and re-renders only when a flag changes.
// Plain ES module with no JSX, so it loads without a build step; React is a peer dependency.

import { createContext, createElement, useContext, useSyncExternalStore } from 'react';

/**
 * @typedef {import('./index.d.ts').FlagsClient} FlagsClient
 * @typedef {import('./index.d.ts').FlagMap} FlagMap
 * @typedef {import('./index.d.ts').ClientState} ClientState
 */

/** @type {import('react').Context<FlagsClient | null>} */
const FlagsContext = createContext(/** @type {FlagsClient | null} */ (null));

/**
 * Make `client` available to the hooks below it.
 * @param {{ client: FlagsClient, children?: import('react').ReactNode }} props
 */
export function FlagsProvider({ client, children }) {
  return createElement(FlagsContext.Provider, { value: client }, children);
}

/**
 * The client passed in, or else the one from the nearest `FlagsProvider`.
 * @param {FlagsClient} [client]
 * @returns {FlagsClient}
 */
export function useFlagsClient(client) {
  const provided = useContext(FlagsContext);
  const resolved = client ?? provided;
  if (!resolved) {
    throw new Error('rollgate-proxy: wrap the tree in <FlagsProvider client={...}> or pass a client to the hook');
  }
  return resolved;
}

/**
 * Every flag; re-renders when any flag changes.
 * @param {FlagsClient} [client]
 * @returns {FlagMap}
 */
export function useFlags(client) {
  const c = useFlagsClient(client);
  return useSyncExternalStore(c.subscribe, c.getAll, c.getAll);
}

/**
 * One flag; re-renders only when that flag's value changes.
 * @param {string} key
 * @param {boolean} [defaultValue]
 * @param {FlagsClient} [client]
 * @returns {boolean}
 */
export function useFlag(key, defaultValue = false, client) {
  const c = useFlagsClient(client);
  const read = () => c.isEnabled(key, defaultValue);
  return useSyncExternalStore(c.subscribe, read, read);
}

/**
 * The client's connection state (`connecting`, `open`, `polling`, `error`, `closed`).
 * @param {FlagsClient} [client]
 * @returns {ClientState}
 */
export function useFlagsState(client) {
  const c = useFlagsClient(client);
  return useSyncExternalStore(c.onStateChange, c.state, c.state);
}
