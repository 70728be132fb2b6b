// Fake time for the unit tests: node:test's mock timers drive setTimeout and Date.

import { settle } from './fakes.js';

export const START = 1_700_000_000_000;

/**
 * Mock setTimeout/clearTimeout and Date for one test (restored when it ends).
 * @param {import('node:test').TestContext} t
 */
export function useClock(t) {
  t.mock.timers.enable({ apis: ['setTimeout', 'Date'], now: START });
  return {
    /**
     * Move time forward by `ms` in steps of at most `step`, letting promises settle after each
     * step, so work scheduled when a fake response settles (the next poll) can fire in the same
     * call. Steps end on multiples of `step` from the start of the call.
     */
    async advance(/** @type {number} */ ms, step = 100) {
      let left = ms;
      do {
        const now = Math.min(step, left);
        t.mock.timers.tick(now);
        await settle();
        left -= now;
      } while (left > 0);
    },
  };
}
