// Types for @rollgate-proxy/client/react (src/react.js).

import type { ReactElement, ReactNode } from 'react';
import type { ClientState, FlagMap, FlagsClient } from './index.js';

export interface FlagsProviderProps {
  client: FlagsClient;
  children?: ReactNode;
}

/** Make `client` available to the hooks below it. */
export function FlagsProvider(props: FlagsProviderProps): ReactElement;

/** The client passed in, or else the one from the nearest `FlagsProvider` (throws if neither). */
export function useFlagsClient(client?: FlagsClient): FlagsClient;

/** Every flag; re-renders when any flag changes. */
export function useFlags(client?: FlagsClient): FlagMap;

/** One flag (or `defaultValue`, default `false`, when unknown); re-renders only when it changes. */
export function useFlag(key: string, defaultValue?: boolean, client?: FlagsClient): boolean;

/** The client's connection state; re-renders when it changes. */
export function useFlagsState(client?: FlagsClient): ClientState;
