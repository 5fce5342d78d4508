"""The HTTP client side of the crawl: one chat completion with its own retry loop (backoff,
Retry-After, fatal statuses that stop the run), the key redacted from whatever is logged or
kept, the reply's fields read from whatever a server sends, and the settings of a request."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import openai

from ..errors import LlamaforgeError
from .recipe import build_prompt
from .replies import _count, storable

log = logging.getLogger(__package__)  # "llamaforge.crawl", as one logger for the whole crawl

# Retry timing: exponential backoff from `backoff` seconds, doubled per attempt up to
# BACKOFF_CAP, times a jitter in [0.5, 1]; a server's Retry-After wins, up to MAX_RETRY_AFTER.
BACKOFF_CAP = 60.0
MAX_RETRY_AFTER = 300.0

# Status codes worth another try, besides every 5xx (what the openai client itself retries).
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# Status codes that would fail every request the same way: stop the run instead.
_FATAL_STATUS = {
    401: "set OPENAI_API_KEY to a key this server accepts",
    403: "use a key that is allowed to call this model",
    404: "check --model and --base-url (the URL usually ends in /v1)",
}


def _secret_pattern(secret: str) -> re.Pattern:
    """The key as it may appear in a reply's text: each character as itself or as a JSON escape
    (\\u0073, \\/), so that the key never survives into a file in decoded or escaped form."""
    def one(c: str) -> str:
        forms = [re.escape(c), re.escape(f"\\u{ord(c):04x}"), re.escape(f"\\u{ord(c):04X}")]
        if c == "/":
            forms.append(re.escape("\\/"))
        return "(?:" + "|".join(forms) + ")"
    return re.compile("".join(one(c) for c in secret))


def _redact(text, secret: str):
    if not secret or not isinstance(text, str):
        return text
    return _secret_pattern(secret).sub("***", text)


def _display_url(url: str | None) -> str:
    if not url:
        return "https://api.openai.com/v1 (default)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _retry_after(headers) -> float | None:
    """Seconds a server asked us to wait (Retry-After-Ms, or Retry-After in seconds or a date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


@dataclass
class _Settings:
    model: str
    seed: int
    items_per_request: int
    max_retries: int
    backoff: float
    api_key: str


async def _complete(client, s: _Settings, index: int):
    """One chat completion with retries: (completion, attempts), the completion None if it failed."""
    prompt = build_prompt(s.seed, index, s.items_per_request)
    attempt = 0
    while True:
        attempt += 1
        hint = None
        try:
            completion = await client.chat.completions.create(
                model=s.model, messages=[{"role": "user", "content": prompt}]
            )
            problem = _not_a_completion(completion)
            if problem is None:
                return completion, attempt
            problem, retryable = _redact(problem, s.api_key), True
        except openai.APIStatusError as e:
            problem = f"HTTP {e.status_code}: {_redact(str(e), s.api_key)[:300]}"
            if e.status_code in _FATAL_STATUS:  # would fail every request: stop the run
                raise LlamaforgeError(f"the server answered {problem}", fix=_FATAL_STATUS[e.status_code]) from None
            retryable = e.status_code in _RETRYABLE_STATUS or e.status_code >= 500
            hint = _retry_after(e.response.headers)
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            problem = "timed out" if isinstance(e, openai.APITimeoutError) else "connection error"
            retryable = True
        except openai.APIError as e:  # e.g. a 200 whose body is not valid JSON (a proxy's error page)
            problem = f"{type(e).__name__}: {_redact(str(e), s.api_key)[:300]}"
            retryable = True
        if not retryable or attempt > s.max_retries:
            log.warning("request %d failed after %d attempt(s): %s", index, attempt, problem)
            return None, attempt
        delay = hint if hint is not None else min(BACKOFF_CAP, s.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
        delay = min(delay, MAX_RETRY_AFTER)
        log.info("request %d: %s; retry %d/%d in %.1f s", index, problem, attempt, s.max_retries, delay)
        await asyncio.sleep(delay)


def _not_a_completion(completion) -> str | None:
    """Why a 200 reply is no chat completion (a proxy's HTML page arrives as a str, a JSON error
    object without choices, an empty message), or None when it is one."""
    if isinstance(completion, (str, bytes)):
        return f"the reply is not a chat completion but text: {str(completion)[:120]!r}"
    if not getattr(completion, "choices", None):
        return "the reply is not a chat completion (no choices)"
    content, _, _ = _reply_fields(completion)
    if not isinstance(content, str) or not content.strip():
        return "the reply's message is empty"
    return None


def _reply_fields(completion) -> tuple[str, dict | None, str | None]:
    """Content, usage and finish reason of a completion; servers may omit any of them."""
    choices = getattr(completion, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    content = storable(content) if isinstance(content, str) else ""
    usage = getattr(completion, "usage", None)
    usage_dict = None
    if usage is not None:  # the client does not check types: a count that is no count is unknown (0)
        usage_dict = {key: n if _count(n := getattr(usage, key, None)) else 0
                      for key in ("prompt_tokens", "completion_tokens")}
    finish = getattr(choice, "finish_reason", None)
    return content, usage_dict, storable(finish)[:40] if isinstance(finish, str) else None
