"""MQTT events: what publish() costs the gate, and how fast the buffer drains to Mosquitto.

1. publish() per event (serialise + buffer), no broker involved, against a
   baseline of json.dumps of the same payload alone: the ratio is what the
   envelope, Decimal handling and buffering add on the gating path.
2. Drain throughput: N events buffered, then run() connects to the real
   Mosquitto at 127.0.0.1:1883 and sends them with QoS 1 until flush() returns
   (the connect is inside the timing);
   events/s with the default window of in-flight publishes, against a window of
   1 (stop and wait for each PUBACK) measured in the same run.

The last line is one JSON object. Without Mosquitto the drain part reports an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from decimal import Decimal
from typing import Any

from agent import eventloop
from agent.events.mqtt import WINDOW, EventPublisher, MqttSettings


def _payload(i: int) -> dict[str, Any]:
    return {"call_id": f"1700000000.{i}", "account": "acme", "caller": "02150001234",
            "callee": "13812345678", "result": "ALLOW", "reason": "allowed",
            "max_seconds": 3600, "balance": Decimal("1234.5600"), "rate": Decimal("0.1300")}


def bench_publish(n: int) -> tuple[float, float]:
    """(µs per publish(), µs per bare json.dumps) over the same payloads."""
    payloads = [_payload(i) for i in range(n)]
    publisher = EventPublisher(MqttSettings(buffer=n, node="pbx-1"))
    start = time.perf_counter()
    for p in payloads:
        publisher.publish("decision", p)
    publish_us = (time.perf_counter() - start) / n * 1e6
    assert publisher.depth == n and publisher.rejected == 0
    start = time.perf_counter()
    for p in payloads:
        json.dumps(p, default=str).encode()
    baseline_us = (time.perf_counter() - start) / n * 1e6
    return publish_us, baseline_us


async def bench_drain(n: int, window: int) -> float:
    """Events/s from buffered to acknowledged by Mosquitto (QoS 1)."""
    publisher = EventPublisher(
        MqttSettings(topic_prefix=f"callgate-bench-{uuid.uuid4().hex[:8]}"), window=window)
    for i in range(n):
        publisher.publish("decision", _payload(i))
    task = asyncio.create_task(publisher.run())
    try:
        start = time.perf_counter()
        if not await publisher.flush(120):
            raise RuntimeError(
                f"not drained: {publisher.depth} left, connected={publisher.connected}")
        elapsed = time.perf_counter() - start
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert publisher.published == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--publish-events", type=int, default=100_000)
    parser.add_argument("--drain-events", type=int, default=5_000)
    args = parser.parse_args()

    publish_us, baseline_us = bench_publish(args.publish_events)
    print(f"publish(): {publish_us:.2f} µs/event; bare json.dumps: {baseline_us:.2f} µs "
          f"(x{publish_us / baseline_us:.2f})")
    result: dict[str, Any] = {
        "bench": "mqtt_publish",
        "publish_us": round(publish_us, 3),
        "json_dumps_us": round(baseline_us, 3),
        "publish_vs_json_dumps": round(publish_us / baseline_us, 2),
    }
    try:
        windowed = eventloop.run(bench_drain(args.drain_events, WINDOW))
        stop_and_wait = eventloop.run(bench_drain(args.drain_events, 1))
    except Exception as exc:
        print(f"drain: Mosquitto at 127.0.0.1:1883 unavailable or failing: {exc}")
        result["drain_error"] = str(exc)
    else:
        print(f"drain to Mosquitto, QoS 1: window {WINDOW}: {windowed:,.0f} events/s; "
              f"window 1: {stop_and_wait:,.0f} events/s (x{windowed / stop_and_wait:.2f})")
        result.update({
            "drain_events": args.drain_events,
            "drain_window": WINDOW,
            "drain_events_per_s": round(windowed),
            "drain_window1_events_per_s": round(stop_and_wait),
            "drain_vs_window1": round(windowed / stop_and_wait, 2),
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
