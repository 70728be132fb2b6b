// OpenFeature web SDK (`@openfeature/web-sdk`) with the published OFREP web provider
// (`@openfeature/ofrep-web-provider`, unmodified) against the proxy, in Node 20: the provider only
// needs `fetch`, `crypto.subtle` and a global `EventSource` (from the `eventsource` package, the
// same one Rollgate's Node SDK uses). It evaluates everything with one bulk POST, keeps the ETag
// for `If-None-Match`, and follows the proxy's ADR-0008 `eventStreams` to `/ofrep/v1/sse`.
// (tests/clients/browser/ runs the same provider inside Chromium with the browser's own EventSource.)

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { EventSource } from 'eventsource';
import { OpenFeature, ProviderEvents, ErrorCode, StandardResolutionReasons } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';
import { Mock, Proxy, nextEvent, waitFor } from '../lib/procs.js';

globalThis.EventSource = EventSource;

/** A `fetch` that records what the provider sent and got (the provider itself is untouched). */
function recordingFetch() {
  const calls = [];
  const impl = async (input, init) => {
    const req = new Request(input, init);
    const res = await fetch(req);
    calls.push({ url: req.url, ifNoneMatch: req.headers.get('if-none-match'), status: res.status });
    return res;
  };
  return { impl, calls };
}

describe('OFREP web provider → proxy (bulk, ETag/304, SSE)', () => {
  /** @type {Mock} */ let mock;
  /** @type {Proxy} */ let proxy;

  before(async () => {
    mock = await Mock.start();
    await mock.setUserFlags('u-beta', { 'enabled-flag': false, 'disabled-flag': true, 'beta-only': true });
    proxy = await Proxy.start(mock);
  });

  after(async () => {
    await OpenFeature.close();
    await proxy?.stop();
    await mock?.stop();
  });

  test('bulk evaluation: every flag with value, reason and variant as the proxy evaluates it', async () => {
    const fetchRec = recordingFetch();
    const ctx = { targetingKey: 'user-1' };
    await OpenFeature.setContext('bulk', ctx);
    await OpenFeature.setProviderAndWait(
      'bulk',
      new OFREPWebProvider({ baseUrl: proxy.url, cacheMode: 'disabled', changeDetection: 'none', fetchImplementation: fetchRec.impl }),
    );
    const client = OpenFeature.getClient('bulk');
    const reference = await proxy.ofrepBulk(ctx);
    assert.ok(reference.flags.length >= 5, JSON.stringify(reference));
    for (const item of reference.flags) {
      const details = client.getBooleanDetails(item.key, !item.value);
      assert.deepEqual(
        { value: details.value, reason: details.reason, variant: details.variant, errorCode: details.errorCode },
        { value: item.value, reason: item.reason, variant: item.variant, errorCode: undefined },
        item.key,
      );
    }
    assert.equal(client.getBooleanValue('enabled-flag', false), true);
    assert.equal(client.getBooleanDetails('disabled-flag', true).reason, StandardResolutionReasons.DISABLED);
    const missing = client.getBooleanDetails('missing-flag', true);
    assert.equal(missing.value, true);
    assert.equal(missing.errorCode, ErrorCode.FLAG_NOT_FOUND);
    assert.equal(fetchRec.calls.length, 1, 'one bulk request for all flags');

    // A context change re-evaluates for the new user (a new ETag, so a 200, not a stale 304).
    await OpenFeature.setContext('bulk', { targetingKey: 'u-beta' });
    assert.equal(client.getBooleanValue('beta-only', false), true);
    assert.equal(client.getBooleanValue('enabled-flag', true), false);
    assert.equal(fetchRec.calls.at(-1).status, 200);
  });

  test('polling sends If-None-Match and gets 304 until a change, then 200 and ConfigurationChanged', async () => {
    const fetchRec = recordingFetch();
    await OpenFeature.setContext('poll', { targetingKey: 'user-2' });
    await OpenFeature.setProviderAndWait(
      'poll',
      new OFREPWebProvider({
        baseUrl: proxy.url,
        cacheMode: 'disabled',
        changeDetection: 'polling',
        pollInterval: 200,
        fetchImplementation: fetchRec.impl,
      }),
    );
    const client = OpenFeature.getClient('poll');
    let changes = 0;
    client.addHandler(ProviderEvents.ConfigurationChanged, () => changes++);
    await waitFor(() => fetchRec.calls.filter((c) => c.status === 304).length >= 3, 5000, 'three 304 polls');
    const polls = fetchRec.calls.slice(1);
    assert.ok(polls.every((c) => c.ifNoneMatch && c.ifNoneMatch.startsWith('"')), JSON.stringify(polls));
    assert.ok(polls.every((c) => c.status === 304), JSON.stringify(polls));
    assert.equal(changes, 0);
    assert.equal(client.getBooleanValue('max-items', false), true, 'a 304 keeps the flags');

    const changed = nextEvent((h) => client.addHandler(ProviderEvents.ConfigurationChanged, h), 3000, 'ConfigurationChanged');
    await mock.setFlag('max-items', false);
    const [event] = await changed;
    assert.deepEqual(event.flagsChanged, ['max-items']);
    assert.equal(client.getBooleanValue('max-items', true), false);
    assert.equal(fetchRec.calls.at(-1).status, 200);
    await OpenFeature.clearProviders('poll');
    await mock.setFlag('max-items', true);
  });

  test('ADR-0008: the provider follows eventStreams to /ofrep/v1/sse and refetches on a change within 2 s', async () => {
    const fetchRec = recordingFetch();
    await OpenFeature.setContext('sse', { targetingKey: 'user-3' });
    await OpenFeature.setProviderAndWait(
      'sse',
      new OFREPWebProvider({ baseUrl: proxy.url, cacheMode: 'disabled', fetchImplementation: fetchRec.impl }),
    );
    const client = OpenFeature.getClient('sse');
    const bulk = await proxy.ofrepBulk({ targetingKey: 'user-3' });
    assert.deepEqual(bulk.eventStreams, [{ type: 'sse', endpoint: { requestUri: '/ofrep/v1/sse' } }]);
    // The SSE connection is open once the proxy counts it.
    await waitFor(async () => (await proxy.json('/api/health')).sseClients >= 1, 5000, 'the provider’s SSE connection');
    assert.equal(fetchRec.calls.length, 1, 'no polling while SSE is connected');
    assert.equal(client.getBooleanValue('enabled-flag', false), true);

    // A generous bound on the event, never a timing assertion; the time is printed as a figure.
    const changed = nextEvent((h) => client.addHandler(ProviderEvents.ConfigurationChanged, h), 10_000, 'ConfigurationChanged');
    const start = Date.now();
    await mock.setFlag('enabled-flag', false);
    const [event] = await changed;
    console.log(`# ConfigurationChanged after ${Date.now() - start} ms`);
    assert.deepEqual(event.flagsChanged, ['enabled-flag']);
    assert.equal(client.getBooleanValue('enabled-flag', true), false);
    // The refetch was the ADR-0008 one: conditional, with the notification's etag as a hint.
    const refetch = fetchRec.calls.at(-1);
    assert.equal(refetch.status, 200);
    assert.ok(refetch.ifNoneMatch, 'refetch sends If-None-Match');
    assert.ok(new URL(refetch.url).searchParams.get('flagConfigEtag'), refetch.url);
    await OpenFeature.clearProviders('sse');
    await mock.setFlag('enabled-flag', true);
  });
});

describe('OFREP web provider with client keys', () => {
  const CLIENT_KEY = 'ck_ofrep_web';
  /** @type {Mock} */ let mock;
  /** @type {Proxy} */ let proxy;

  before(async () => {
    mock = await Mock.start();
    proxy = await Proxy.start(mock, ['--client-keys', CLIENT_KEY]);
  });

  after(async () => {
    await OpenFeature.close();
    await proxy?.stop();
    await mock?.stop();
  });

  test('X-API-Key works for bulk, and the advertised SSE stream also authenticates (EventSource sends no headers)', async () => {
    await OpenFeature.setContext('keyed', { targetingKey: 'user-1' });
    await OpenFeature.setProviderAndWait(
      'keyed',
      new OFREPWebProvider({ baseUrl: proxy.url, cacheMode: 'disabled', headers: [['X-API-Key', CLIENT_KEY]] }),
    );
    const client = OpenFeature.getClient('keyed');
    assert.equal(client.getBooleanDetails('enabled-flag', false).value, true);
    assert.equal(client.getBooleanDetails('enabled-flag', false).errorCode, undefined);
    // The provider opens `new EventSource(<advertised url>)`: without a credential in that URL
    // the proxy answers 401 and, with polling off (the provider's default), no change ever
    // arrives. The proxy should advertise a stream URL that carries the key (ADR-0008 allows
    // credentials in the opaque URL) when the bulk request was authenticated with one.
    const health = () => proxy.json('/api/health', { headers: { 'X-API-Key': CLIENT_KEY } });
    await waitFor(async () => (await health()).sseClients >= 1, 3000, 'an authenticated OFREP SSE connection');
    const changed = nextEvent((h) => client.addHandler(ProviderEvents.ConfigurationChanged, h), 2000, 'ConfigurationChanged');
    await mock.setFlag('enabled-flag', false);
    await changed;
    assert.equal(client.getBooleanValue('enabled-flag', true), false);
  });
});
