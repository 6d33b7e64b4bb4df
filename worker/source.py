"""Pub/Sub StreamingPull: flow control, leases, reconnection, and the one place that acks or nacks."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
        self._late_acks: list[str] = []
        self._late_nacks: list[str] = []

    def run(self, stop: threading.Event) -> None:
        """Pull until `stop` is set, re-subscribing after stream failures (e.g. a broker restart)."""
        # Leases are renewed in short steps up to max_lease_s, so a message held by a worker that
        # died or left comes back within seconds rather than after the client's 60 s default.
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.settings.flow_max_messages, max_bytes=self.settings.flow_max_bytes,
            max_lease_duration=self.settings.max_lease_s,
            max_duration_per_lease_extension=self.settings.lease_extension_s)
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
            with self._lock:  # arrived while closing: hand it back with the rest
                self._late_nacks.append(message.ack_id)
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
        with self._lock:
            self._in_flight.pop(id(fut), None)
            late = self._draining.is_set()
            if late:  # the stream is closing: settle with one unary call at the end instead
                (self._late_acks if outcome.ack else self._late_nacks).append(message.ack_id)
            if not self._in_flight:
                self._idle.notify_all()
        if not late:
            message.ack() if outcome.ack else message.nack()

    def _shutdown(self, stream: pubsub_v1.subscriber.futures.StreamingPullFuture) -> None:
        """Shutdown order: (1) close the stream, so nothing new arrives (the client library hands back
        what it held but had not dispatched); (2) cancel tasks not yet in an engine call; (3) give the
        call in progress until `drain_s` after the signal to finish and write; (4) ack what was written
        and nack the rest with direct calls, which do not need the stream. Cloud Run allows 10 s.

        Nacking while the stream is open would only bring the same messages straight back, and with a
        retry policy every such round trip lengthens their redelivery backoff."""
        deadline = time.monotonic() + self.settings.drain_s
        self._draining.set()
        stream.cancel()
        try:
            stream.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a cancelled stream may end with any error; we are leaving
            pass
        cancelled = self.runner.cancel_queued()
        with self._lock:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._late_nacks.extend(message.ack_id for message, _ in self._in_flight.values())
            unfinished = len(self._in_flight)
            acks, nacks = list(self._late_acks), list(self._late_nacks)
        self._settle_directly(acks, nacks)
        log.info("stopped pulling: %d acked while closing, %d handed back for redelivery "
                 "(%d not yet started, %d unfinished)", len(acks), len(nacks), cancelled, unfinished)

    def _settle_directly(self, acks: list[str], nacks: list[str]) -> None:
        for i in range(0, len(acks), 1000):
            self._quietly(self.subscriber.acknowledge, subscription=self.subscription, ack_ids=acks[i:i + 1000])
        for i in range(0, len(nacks), 1000):
            self._quietly(self.subscriber.modify_ack_deadline, subscription=self.subscription,
                          ack_ids=nacks[i:i + 1000], ack_deadline_seconds=0)

    @staticmethod
    def _quietly(call: Callable[..., object], **kwargs: object) -> None:
        """A failed ack or nack costs a redelivery (results are create-only, so that is safe)."""
        try:
            call(timeout=2.0, **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not settle %d messages while stopping (%s); they will be redelivered",
                        len(kwargs.get("ack_ids", [])), exc)
