"""Pub/Sub StreamingPull: flow control, leases, reconnection, and the one place that acks or nacks."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from google.cloud import pubsub_v1

from worker.runner import Delivery, Outcome, Runner
from worker.settings import Settings

log = logging.getLogger(__name__)


class PullWorker:
    """Pulls messages into the runner and settles each one when its outcome is known."""

    def __init__(self, *, runner: Runner, subscription: str, settings: Settings,
                 subscriber: pubsub_v1.SubscriberClient | None = None) -> None:
        self.runner = runner
        self.subscription = subscription
        self.settings = settings
        self.subscriber = subscriber or pubsub_v1.SubscriberClient()
        self._draining = threading.Event()
        self._in_flight: dict[int, tuple[pubsub_v1.subscriber.message.Message, Future]] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def run(self, stop: threading.Event) -> None:
        """Pull until `stop` is set, re-subscribing after stream failures (e.g. a broker restart)."""
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.settings.flow_max_messages, max_bytes=self.settings.flow_max_bytes,
            max_lease_duration=self.settings.max_lease_s)
        backoff = 0.5
        while not stop.is_set():
            stream = self.subscriber.subscribe(self.subscription, self._on_message, flow_control=flow)
            log.info("pulling from %s", self.subscription)
            while not stop.is_set() and not stream.done():
                stop.wait(0.5)
            if stop.is_set():
                self._shutdown(stream)
                return
            try:
                stream.result()
            except Exception as exc:  # noqa: BLE001 - any stream failure is answered by reconnecting
                log.warning("pull stream ended (%s); reconnecting in %.1fs", exc, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _on_message(self, message: pubsub_v1.subscriber.message.Message) -> None:
        if self._draining.is_set():
            message.nack()
            return
        delivery = Delivery(data=message.data, attributes=dict(message.attributes), message_id=message.message_id,
                            delivery_attempt=message.delivery_attempt)
        outcome = self.runner.submit(delivery)
        with self._lock:
            self._in_flight[id(outcome)] = (message, outcome)
        outcome.add_done_callback(lambda fut: self._settle(message, fut))

    def _settle(self, message: pubsub_v1.subscriber.message.Message, fut: Future) -> None:
        """Ack or nack: the only place this happens. The runner resolves only after the write."""
        outcome: Outcome = fut.result()
        if outcome.ack:
            message.ack()
        else:
            message.nack()
        with self._lock:
            self._in_flight.pop(id(fut), None)
            if not self._in_flight:
                self._idle.notify_all()

    def _shutdown(self, stream: pubsub_v1.subscriber.futures.StreamingPullFuture) -> None:
        """Shutdown order: (1) stop taking work, nacking anything newly delivered; (2) give work in
        flight `drain_s` to finish and be acked while the stream is still open; (3) nack the rest,
        so Pub/Sub redelivers it at once; (4) close the stream. Cloud Run allows 10 s in all."""
        self._draining.set()
        deadline = time.monotonic() + self.settings.drain_s
        with self._lock:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, deadline - time.monotonic()))
            left = list(self._in_flight.values())
        for message, _ in left:
            message.nack()
        log.info("stopping: %d in flight left unacknowledged for redelivery", len(left))
        stream.cancel()
        try:
            stream.result(timeout=2.0)
        except Exception:  # noqa: BLE001 - a cancelled stream may end with any error; we are leaving
            pass
