// Compile-time checks of index.d.ts and react.d.ts from a consumer's point of view (`tsc --noEmit`
// in `npm test`); never executed. `@ts-expect-error` lines fail the check if they stop erroring.

import { createClient, contextToQuery, RollgateProxyError } from '../src/index.js';
import type { ClientState, FlagMap, FlagsClient } from '../src/index.js';
import { FlagsProvider, useFlag, useFlags, useFlagsState } from '../src/react.js';

// The platform's own fetch and EventSource fit the injectable types.
const client: FlagsClient = createClient({
  url: 'https://flags.example.com',
  mode: 'stream',
  context: { id: 'u1', email: 'a@b.c', attributes: { plan: 'pro', seats: 3, beta: true } },
  clientKey: 'ck_123',
  pollIntervalMs: 30_000,
  fetch: globalThis.fetch,
  EventSource: globalThis.EventSource,
});
createClient({ mode: 'poll', EventSource: null });
createClient();
// @ts-expect-error: unknown mode
createClient({ mode: 'websocket' });
// @ts-expect-error: attribute values are primitives
createClient({ context: { attributes: { nested: { a: 1 } } } });

const enabled: boolean = client.isEnabled('new-checkout', true);
const all: FlagMap = client.getAll();
// @ts-expect-error: the snapshot is read-only
all['x'] = true;
const unsubscribe: () => void = client.subscribe((flags, changed) => {
  const first: string | undefined = changed[0];
  void flags['a'];
  void first;
});
unsubscribe();
client.onStateChange((state: ClientState, error: RollgateProxyError | null) => {
  if (error) void error.code.toUpperCase();
  void state;
});
const ready: Promise<boolean> = client.ready;
const when: Date | null = client.lastUpdated();
const switched: Promise<boolean> = client.setContext({ id: 'u2' });
const query: string = contextToQuery({ id: 'u' }, 'token');
void [enabled, ready, when, switched, query];
client.close();

function Checkout(): null {
  const flags: FlagMap = useFlags();
  const on: boolean = useFlag('new-checkout', false, client);
  const state: ClientState = useFlagsState();
  void [flags, on, state];
  return null;
}
void Checkout;
void FlagsProvider({ client, children: null });
