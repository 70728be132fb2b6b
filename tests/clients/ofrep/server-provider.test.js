// OpenFeature server SDK (`@openfeature/server-sdk`) with the published OFREP provider
// (`@openfeature/ofrep-provider`, unmodified) pointed at the proxy's `/ofrep/v1/evaluate/flags/{key}`.
// The provider evaluates one flag per call (it has no bulk mode), so each detail below is one
// real POST to the proxy.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { OpenFeature, ErrorCode, StandardResolutionReasons } from '@openfeature/server-sdk';
import { OFREPProvider } from '@openfeature/ofrep-provider';
import { Mock, Proxy } from '../lib/procs.js';

const CLIENT_KEY = 'ck_ofrep_server';

/** The proxy's own OFREP answer for one flag: the reference the provider must report. */
async function raw(proxy, key, context, headers = {}) {
  const res = await fetch(`${proxy.url}/ofrep/v1/evaluate/flags/${key}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ context }),
    signal: AbortSignal.timeout(5000),
  });
  return { status: res.status, body: await res.json() };
}

describe('OFREP server provider → proxy', () => {
  /** @type {Mock} */ let mock;
  /** @type {Proxy} */ let proxy;

  before(async () => {
    mock = await Mock.start();
    await mock.setUserFlags('u-beta', { 'enabled-flag': false, 'disabled-flag': true, 'beta-only': true });
    proxy = await Proxy.start(mock);
    await OpenFeature.setProviderAndWait(new OFREPProvider({ baseUrl: proxy.url }));
  });

  after(async () => {
    await OpenFeature.close();
    await proxy?.stop();
    await mock?.stop();
  });

  test('boolean flags: value, reason and variant as the proxy evaluates them', async () => {
    const client = OpenFeature.getClient();
    const ctx = { targetingKey: 'user-1' };

    const on = await client.getBooleanDetails('enabled-flag', false, ctx);
    assert.equal(on.value, true);
    assert.equal(on.variant, 'on');
    assert.equal(on.errorCode, undefined);
    const off = await client.getBooleanDetails('disabled-flag', true, ctx);
    assert.equal(off.value, false);
    assert.equal(off.variant, 'off');
    assert.equal(off.reason, StandardResolutionReasons.DISABLED);

    for (const key of ['enabled-flag', 'disabled-flag', 'rollout-50']) {
      const details = await client.getBooleanDetails(key, false, ctx);
      const { status, body } = await raw(proxy, key, ctx);
      assert.equal(status, 200);
      assert.deepEqual(
        { value: details.value, reason: details.reason, variant: details.variant },
        { value: body.value, reason: body.reason, variant: body.variant },
        key,
      );
      assert.ok(['TARGETING_MATCH', 'SPLIT', 'DEFAULT', 'DISABLED', 'STATIC', 'UNKNOWN'].includes(details.reason), details.reason);
    }
  });

  test('per-user evaluation follows the context (targetingKey = Rollgate user id)', async () => {
    const client = OpenFeature.getClient();
    const beta = { targetingKey: 'u-beta', email: 'beta@example.com' };
    assert.equal(await client.getBooleanValue('beta-only', false, beta), true);
    assert.equal(await client.getBooleanValue('enabled-flag', true, beta), false);
    assert.equal(await client.getBooleanValue('disabled-flag', false, beta), true);
    // rollout-50 splits users; whatever each gets must be what Rollgate says for that user.
    const seen = new Set();
    for (const user of ['user-1', 'user-2', 'user-3', 'user-4', 'consistent-user-123']) {
      const details = await client.getBooleanDetails('rollout-50', false, { targetingKey: user });
      assert.equal(details.errorCode, undefined, user);
      const value = details.value;
      const upstream = (await mock.view(user)).flags['rollout-50'];
      assert.equal(value, upstream, user);
      seen.add(value);
    }
    assert.deepEqual([...seen].sort(), [false, true], 'users on both sides of rollout-50');
  });

  test('unknown flag: the caller default with FLAG_NOT_FOUND', async () => {
    const client = OpenFeature.getClient();
    const details = await client.getBooleanDetails('missing-flag', true, { targetingKey: 'user-1' });
    assert.equal(details.value, true);
    assert.equal(details.errorCode, ErrorCode.FLAG_NOT_FOUND);
    assert.equal(details.reason, StandardResolutionReasons.ERROR);
    const { status, body } = await raw(proxy, 'missing-flag', { targetingKey: 'user-1' });
    assert.equal(status, 404);
    assert.equal(body.errorCode, 'FLAG_NOT_FOUND');
  });

  test('a change at Rollgate is visible on the next evaluation', async () => {
    const client = OpenFeature.getClient();
    assert.equal(await client.getBooleanValue('enabled-flag', false, { targetingKey: 'user-1' }), true);
    await mock.setFlag('enabled-flag', false);
    const deadline = Date.now() + 2000;
    let value = true;
    while (value && Date.now() < deadline) {
      value = await client.getBooleanValue('enabled-flag', true, { targetingKey: 'user-1' });
      if (value) await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(value, false, 'flag change reached OFREP within 2 s');
    await mock.setFlag('enabled-flag', true);
  });
});

describe('OFREP server provider with client keys', () => {
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

  test('X-API-Key (the OFREP header) is accepted; a missing key is an error, not a value', async () => {
    OpenFeature.setProvider('keyed', new OFREPProvider({ baseUrl: proxy.url, headers: [['X-API-Key', CLIENT_KEY]] }));
    OpenFeature.setProvider('bearer', new OFREPProvider({ baseUrl: proxy.url, headers: [['Authorization', `Bearer ${CLIENT_KEY}`]] }));
    OpenFeature.setProvider('anonymous', new OFREPProvider({ baseUrl: proxy.url }));
    const ctx = { targetingKey: 'user-1' };

    const keyed = await OpenFeature.getClient('keyed').getBooleanDetails('enabled-flag', false, ctx);
    assert.equal(keyed.value, true);
    assert.equal(keyed.errorCode, undefined);
    const bearer = await OpenFeature.getClient('bearer').getBooleanDetails('enabled-flag', false, ctx);
    assert.equal(bearer.value, true);

    const refused = await OpenFeature.getClient('anonymous').getBooleanDetails('enabled-flag', false, ctx);
    assert.equal(refused.value, false, 'the default');
    assert.equal(refused.reason, StandardResolutionReasons.ERROR);
    assert.ok(refused.errorCode, 'an error code is reported');
    const { status } = await raw(proxy, 'enabled-flag', ctx);
    assert.equal(status, 401);
  });
});
