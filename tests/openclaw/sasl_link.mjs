// The plugin's Kafka link (src/kafka.js) against a SASL or TLS broker (tests/secured.py):
// settings from the environment (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*) as on a gateway.
// Usage: node sasl_link.mjs BOOTSTRAP NAMESPACE; prints {"sent": n, "ready": bool}.
import { BudgetBook } from "../../integrations/openclaw/src/budget.js";
import { resolveConfig } from "../../integrations/openclaw/src/config.js";
import { KafkaLink } from "../../integrations/openclaw/src/kafka.js";

const [bootstrap, namespace] = process.argv.slice(2);
const config = resolveConfig({ brokers: [bootstrap], namespace });
const book = new BudgetBook({ failOpen: true, localLimitAction: "none", localLimitMessage: "",
                              unavailableMessage: "", pendingTtlMs: 600_000 });
const logger = { info: () => {}, warn: (text) => console.error(text) };
const link = new KafkaLink({ config, book, logger });
link.start();
link.send({ event_id: "js-1", occurred_at: new Date().toISOString(), user_id: "alice",
            model: "m", input_tokens: 5, output_tokens: 0 });
const deadline = Date.now() + 60_000;
while ((link.sent < 1 || !book.ready) && Date.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 100));
}
await link.stop();
console.log(JSON.stringify({ sent: link.sent, ready: book.ready }));
process.exit(0);
