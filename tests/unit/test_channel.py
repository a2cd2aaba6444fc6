"""The run channel's actor logic (``workers.loop.channel``), without Ray: each named queue
keeps its own items in order, and a get that times out says so instead of raising. The
real actor, between a driver, a controller and workers, is in every integration run."""

from __future__ import annotations

import asyncio

from workers.loop.channel import _Channel


def test_named_queues_keep_their_own_items_in_order_and_a_get_times_out():
    async def scenario() -> list:
        channel = _Channel()
        await channel.put("events", {"epoch": 1})
        await channel.put("stop", "SIGTERM")
        await channel.put("events", {"epoch": 2})
        return [await channel.get("events", 0.1), await channel.get("events", 0.1),
                await channel.get("events", 0.05), await channel.get("stop", 0.1),
                await channel.get("stop", 0), await channel.put("stop", "again"),
                await channel.get("stop", 0)]

    assert asyncio.run(scenario()) == [(True, {"epoch": 1}), (True, {"epoch": 2}),
                                       (False, None), (True, "SIGTERM"), (False, None), None,
                                       (True, "again")]


def test_a_waiting_get_returns_as_soon_as_an_item_is_put():
    async def scenario() -> tuple:
        channel = _Channel()
        waiting = asyncio.ensure_future(channel.get("stop", 30))
        await asyncio.sleep(0.05)
        await channel.put("stop", "SIGINT")
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(scenario()) == (True, "SIGINT")


def test_runs_on_one_channel_keep_apart_and_an_ended_runs_queues_go():
    async def scenario() -> list:
        channel = _Channel()
        await channel.put("run-a/events", 1)
        await channel.put("run-b/events", 2)
        await channel.close("run-a")
        await channel.put("run-a/events", 3)  # late news of the ended run
        return [await channel.get("run-b/events", 0), await channel.get("run-a/events", 0),
                sorted(channel._queues), await channel.ping()]

    assert asyncio.run(scenario()) == [(True, 2), (False, None), ["run-a/events", "run-b/events"],
                                       True]
