"""How much of the writes' work may land on the caller's event loop in one of its iterations."""

from __future__ import annotations

from weakref import WeakKeyDictionary

import anyio

__all__ = ["PUT_SLOTS", "put_slots"]

# One loop iteration runs every callback that is ready: 50 PutObjects started together each spend ~0.5-1 ms of
# pure Python (hooks, endpoint, signing, request building, connect) before their first wait on the network, and
# the caller's timers wait for all of them. A few at a time keep an iteration short; on one client a few requests
# at once already fill what a loop thread can prepare while others are on the network.
PUT_SLOTS = 4

_put_slots: WeakKeyDictionary[object, anyio.Semaphore] = WeakKeyDictionary()


def put_slots(client: object) -> anyio.Semaphore:
    """
    The slots that bound the ``PutObject`` requests in flight through one client, on its event loop.

    :param client: The S3 client; a client lives on one event loop.
    :return: A semaphore of :data:`PUT_SLOTS`, one per client.
    """
    slots = _put_slots.get(client)
    if slots is None:
        slots = _put_slots[client] = anyio.Semaphore(PUT_SLOTS)
    return slots
