/**
 * The Kafka shell: sends usage events to usage.raw and follows budget.decisions.
 *
 * Nothing here runs on a request's path. `send` appends to an in-memory queue that a
 * background loop drains with an idempotent producer (acks=all), retrying with backoff
 * while Kafka is away (the queue keeps the newest `maxQueue` events). The follower reads
 * the compacted budget.decisions from its beginning into the BudgetBook, then follows it;
 * the book is marked ready once every partition has been read to the end it had at start.
 *
 * kafkajs (pure JavaScript, no binaries) speaks the protocol versions Kafka 4 kept
 * (KIP-896); it has no manual partition assignment, so the follower joins a consumer group
 * of its own (a unique id, never committing) and starts from the beginning.
 */

import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import kafkajs from "kafkajs";
import { isDecision } from "./budget.js";
import { connectionOptions } from "./config.js";

const { Kafka, logLevel } = kafkajs;

const BATCH = 500;

/**
 * @param {import("./plugin.js").Logger} logger
 * @returns {import("kafkajs").logCreator}
 */
function logCreator(logger) {
  return () => ({ level, log }) => {
    const text = `tally kafka: ${log.message}${log.error ? ` (${log.error})` : ""}`;
    if (level <= logLevel.ERROR) logger.warn(text);
  };
}

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms).unref?.());

export class KafkaLink {
  /**
   * @param {object} p
   * @param {import("./config.js").TallyConfig} p.config
   * @param {import("./budget.js").BudgetBook} p.book
   * @param {import("./plugin.js").Logger} p.logger
   * @param {number} [p.maxQueue]
   */
  constructor({ config, book, logger, maxQueue = 100_000 }) {
    this.config = config;
    this.book = book;
    this.logger = logger;
    this.maxQueue = maxQueue;
    /** @type {import("./usage.js").UsageEvent[]} */
    this.queue = [];
    this.dropped = 0;
    this.sent = 0;
    this.running = false;
    this.started = false;
    this.flushing = false;
    this.scheduled = false;
    /** @type {Promise<void> | null} */
    this.flushDone = null;
    /** @type {Promise<void> | null} */
    this.followed = null;
    /** @type {(() => void) | null} */
    this.removeJoinListener = null;
    this.kafka = new Kafka({
      clientId: config.clientId,
      brokers: config.brokers,
      ...connectionOptions(config.security),
      logLevel: logLevel.ERROR,
      logCreator: logCreator(logger),
      retry: { initialRetryTime: 200, maxRetryTime: 5_000, retries: 8 },
    });
    this.producer = this.kafka.producer({ idempotent: true, maxInFlightRequests: 1,
                                          allowAutoTopicCreation: false });
    this.consumer = this.kafka.consumer({
      groupId: `${config.clientId}-${hostname()}-${process.pid}-${randomUUID().slice(0, 8)}`,
      allowAutoTopicCreation: false,
      maxWaitTimeInMs: 100,
      retry: { retries: Number.MAX_SAFE_INTEGER, maxRetryTime: 10_000 },
    });
  }

  /**
   * Queue one event for usage.raw; never throws, never waits. The sending starts on a
   * later turn of the event loop, outside the hook that called this.
   * @param {any} event
   */
  send(event) {
    this.queue.push(event);
    if (this.queue.length > this.maxQueue) {
      this.queue.shift();
      this.dropped += 1;
      if (this.dropped % 1000 === 1) {
        this.logger.warn(`tally: usage queue full, ${this.dropped} oldest events dropped`);
      }
    }
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => {
        this.scheduled = false;
        this.#flushSoon();
      });
    }
  }

  /** Connect in the background; returns at once. */
  start() {
    if (this.running) return;
    this.running = true;
    this.started = true;
    // kafkajs restarts a consumer after a retriable crash by itself; after any other it
    // stays stopped, and the book would be frozen at what it last read.
    this.consumer.on(this.consumer.events.CRASH, (event) => {
      if (!this.running || event?.payload?.restart) return;
      this.logger.warn(`tally: the ${this.config.topics.budgetDecisions} follower crashed: `
                       + `${event?.payload?.error}`);
      this.followed = this.#followUntilStopped();
    });
    this.followed = this.#followUntilStopped();
    this.#flushSoon();
  }

  /** Start unless started before (a hook arriving before the service started it). */
  ensureStarted() {
    if (!this.started) this.start();
  }

  /** Send what is queued (for up to `graceMs`), then disconnect. */
  async stop(graceMs = 3_000) {
    if (!this.running) return;
    this.running = false;
    await Promise.race([this.flushDone ?? Promise.resolve(), sleep(graceMs)]);
    await Promise.race([this.followed ?? Promise.resolve(), sleep(graceMs)]);
    const disconnected = Promise.allSettled([this.consumer.disconnect(),
                                             this.producer.disconnect()]);
    await Promise.race([disconnected, sleep(2_000)]);
  }

  #flushSoon() {
    if (!this.running || this.flushing) return;
    this.flushing = true;
    this.flushDone = this.#flush()
      .catch((error) => this.logger.warn(`tally: sending usage failed: ${error}`))
      .finally(() => {
        this.flushing = false;
        if (this.running && this.queue.length) this.#flushSoon();
      });
  }

  async #flush() {
    let backoff = 250;
    let connected = false;
    while (this.queue.length) {
      try {
        if (!connected) await this.producer.connect();
        connected = true;
        await this.#sendBatch(this.queue.slice(0, BATCH));
        backoff = 250;
      } catch (error) {
        if (!this.running) return;
        this.logger.warn(`tally: usage.raw unreachable, ${this.queue.length} events kept: ${error}`);
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 30_000);
      }
    }
  }

  /** @param {import("./usage.js").UsageEvent[]} batch */
  async #sendBatch(batch) {
    await this.producer.send({
      topic: this.config.topics.usageRaw,
      acks: -1,
      messages: batch.map((e) => ({ key: e.user_id, value: JSON.stringify(e) })),
    });
    this.queue.splice(0, batch.length);
    this.sent += batch.length;
  }

  /**
   * Follow budget.decisions until stopped. A start that fails (a topic not created yet, a
   * leader still being elected right after creation, a broker away) is retried with
   * backoff instead of leaving the book unfed for the gateway's lifetime.
   */
  async #followUntilStopped() {
    let backoff = 250;
    while (this.running) {
      try {
        await this.#follow();
        return;
      } catch (error) {
        if (!this.running) return;
        this.logger.warn(`tally: following ${this.config.topics.budgetDecisions} failed, `
                         + `retrying in ${backoff} ms: ${error}`);
        await this.consumer.disconnect().catch(() => {});
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 10_000);
      }
    }
  }

  async #follow() {
    const topic = this.config.topics.budgetDecisions;
    const targets = await this.#endOffsets(topic);
    /** @type {Map<number, number>} */
    const reached = new Map();
    const checkReady = () => {
      if (!this.book.ready && [...targets].every(([p, end]) => (reached.get(p) ?? 0) >= end)) {
        this.book.markReady();
        this.logger.info(`tally: ${this.book.decisions.size} budget decisions loaded from ${topic}`);
      }
    };
    this.removeJoinListener?.();
    this.removeJoinListener = this.consumer.on(this.consumer.events.GROUP_JOIN, checkReady);
    await this.consumer.connect();
    await this.consumer.subscribe({ topic, fromBeginning: true });
    await this.consumer.run({
      autoCommit: false,
      eachBatch: async ({ batch }) => {
        for (const message of batch.messages) this.#apply(message, batch);
        reached.set(batch.partition, Number(batch.lastOffset()) + 1);
        checkReady();
      },
    });
  }

  /** @param {string} topic */
  async #endOffsets(topic) {
    const admin = this.kafka.admin({ retry: { retries: Number.MAX_SAFE_INTEGER,
                                              maxRetryTime: 10_000 } });
    await admin.connect();
    try {
      const offsets = await admin.fetchTopicOffsets(topic);
      return new Map(offsets.filter((o) => o.high !== o.low)
        .map((o) => [o.partition, Number(o.high)]));
    } finally {
      await admin.disconnect();
    }
  }

  /**
   * Take in one record of budget.decisions; one that is not a decision is logged with its
   * place (topic, partition, offset) and skipped, and the follower goes on.
   * @param {import("kafkajs").KafkaMessage} message
   * @param {{topic: string, partition: number}} batch
   */
  #apply(message, batch) {
    if (!message.key) return;
    const user = message.key.toString();
    try {
      const decision = message.value ? JSON.parse(message.value.toString()) : null;
      if (decision !== null && !isDecision(decision, user)) {
        throw new Error("not a budget decision for its key");
      }
      this.book.applyDecision(user, decision);
    } catch (error) {
      const where = `${batch.topic}[${batch.partition}]@${message.offset}`;
      this.logger.warn(`tally: skipping the record at ${where}: ${String(error).slice(0, 300)}`);
    }
  }
}
