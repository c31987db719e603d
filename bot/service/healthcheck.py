"""Container health probe: ``python -m bot.service.healthcheck``.

GETs ``http://127.0.0.1:$HTTP_PORT/healthz`` (port 8080 unless set) with a 4 s timeout and exits 0 on HTTP 200,
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


def check() -> tuple[bool, str]:
    try:
        url = f"http://127.0.0.1:{_port()}/healthz"
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
