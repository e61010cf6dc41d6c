# A small HTTP GET whose body is read only up to a limit (helper threads)
#
# For the answers the module reads whole and decodes itself: the printer
# make list (makes.py) and Moonraker's webcam list (webcams.py).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

CHUNK = 64 * 1024


def get_body(http, url: str, timeout, max_bytes: int, what: str,
             **kwargs) -> bytes:
    """GET url with the requests session http, never following a
    redirect; the body, or ValueError if the answer is not 200 or is
    longer than max_bytes."""
    with http.get(url, timeout=timeout, stream=True, allow_redirects=False,
                  **kwargs) as resp:
        if resp.status_code != 200:
            raise ValueError("HTTP %d" % (resp.status_code,))
        body = b""
        for chunk in resp.iter_content(CHUNK):
            body += chunk
            if len(body) > max_bytes:
                raise ValueError("%s is too large" % (what,))
    return body
