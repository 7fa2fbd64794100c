"""The ``openai`` package as applications use it, talking to modeld's front door over its
unix socket (httpx2's transport), without retries so every error reaches the test."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx2
import openai
from sandbox.deploy import Modeld


@contextlib.contextmanager
def openai_client(modeld: Modeld) -> Iterator[openai.OpenAI]:
    transport = httpx2.HTTPTransport(uds=str(modeld.api_socket))
    with httpx2.Client(transport=transport) as http:
        yield openai.OpenAI(
            base_url="http://modeld/v1", api_key="unused", http_client=http, max_retries=0
        )
