"""Container health probe: ``python -m bot.service.healthcheck``.

GETs ``http://$HTTP_HOST:$HTTP_PORT/healthz`` (port 8080 unless set; loopback when HTTP_HOST is unset or a
wildcard such as the image's 0.0.0.0) with a 4 s timeout and exits 0 on HTTP 200,
1 on anything else, with one line on stderr and never a traceback. Standard library only, so the probe stays cheap
and works even when the bot's own imports are broken.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0
DEFAULT_PORT = 8080


def _port() -> int:
    raw = os.environ.get("HTTP_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(f"HTTP_PORT out of range: {raw}")
    return port


def probe_host(host: str) -> str:
    """Where a local client reaches a server listening on ``host`` (URL form): loopback for the wildcards."""
    host = host.strip()
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check() -> tuple[bool, str]:
    try:
        url = f"http://{probe_host(os.environ.get('HTTP_HOST', ''))}:{_port()}/healthz"
    except ValueError as exc:
        return False, f"bad HTTP_PORT: {exc}"
    # No proxies: HTTP(S)_PROXY in the container's environment must not route a loopback probe elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except Exception as exc:  # any failure to get an answer is "unhealthy", never a crash
        return False, f"{url}: {type(exc).__name__}: {exc}"
    return status == 200, f"{url}: HTTP {status}"


def main() -> int:
    ok, message = check()
    print(message, file=sys.stderr if not ok else sys.stdout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
