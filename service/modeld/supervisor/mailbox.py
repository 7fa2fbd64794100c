"""The loop shared by modeld's actors (model owners, the scheduler)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

M = TypeVar("M")


async def serve(
    inbox: asyncio.Queue[M],
    handle: Callable[[M], Awaitable[None]],
    release: Callable[[M, Exception], None],
    actor: str,
) -> None:
    """Handle ``inbox``'s messages one at a time, for ever (until cancelled).

    An internal error while handling one is logged with its traceback and passed to
    ``release``, whose job is that nobody waits for that message's answer forever; the
    actor then goes on with the next message.
    """
    while True:
        message = await inbox.get()
        try:
            await handle(message)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("%s: internal error handling %s", actor, type(message).__name__)
            release(message, err)
