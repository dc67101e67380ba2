/**
 * Tally's message placeholders, rendered in the plugin for its own local messages. Pure.
 * The same names as src/tally/core/templates.py: {percent_used} {period} {tokens_used}
 * {tokens_limit} {tokens_remaining} {reset_time}; unknown names are left as written.
 */

/**
 * @param {string} template
 * @param {Record<string, string | number>} values
 */
export function render(template, values) {
  return template.replace(/\{([a-z_]+)\}/g, (whole, name) =>
    Object.hasOwn(values, name) ? String(values[name]) : whole);
}

/**
 * The placeholder values of one period of the local view.
 * @param {{period: string, tokens_used: number, tokens_limit: number, reset_time: string}} p
 */
export function periodValues({ period, tokens_used, tokens_limit, reset_time }) {
  return {
    period,
    tokens_used,
    tokens_limit,
    tokens_remaining: Math.max(0, tokens_limit - tokens_used),
    percent_used: tokens_limit === 0 ? 100 : Math.floor((100 * tokens_used) / tokens_limit),
    reset_time,
  };
}
