"""Safety: the editor answers only its own page.

A request must name the server by a local host name and its port in ``Host`` (a DNS-rebinding page names its own),
every API call must carry the token the page got at this start (another site's page cannot read it), a POST must be
JSON (or, for an upload, ``application/octet-stream``: types a page cannot send across origins without a preflight
the server never allows), and an ``Origin`` or ``Sec-Fetch-Site`` header, where the browser sends one, must say same
origin. ``refusal`` is framework-free; the app calls it from one middleware.
"""

import hmac

LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
TOKEN_HEADER = "x-hspace-token"


def refusal(method: str, path: str, headers, hosts: set[str], token: str) -> str | None:
    """Why a request is refused (module doc: Safety), or None. ``hosts``: the "name:port" values it may name."""
    host = headers.get("host", "")
    if host not in hosts:
        return f"refused: the Host {host!r} is not this editor ({', '.join(sorted(hosts))})"
    origin = headers.get("origin")
    if origin is not None and origin not in {f"http://{h}" for h in hosts}:
        return f"refused: a request from another site ({origin!r})"
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return f"refused: a {headers.get('sec-fetch-site')} request"
    if not path.startswith("/api/"):
        return None
    if not hmac.compare_digest(headers.get(TOKEN_HEADER, ""), token):
        return "refused: the request lacks this editor's token (reload the page: the token changes at every start)"
    if method == "POST":
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        expected = "application/octet-stream" if path == "/api/upload" else "application/json"
        if kind != expected:
            return f"refused: the body is {kind or 'untyped'}; valid: Content-Type {expected}"
    return None
