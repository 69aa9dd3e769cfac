"""What the load scripts (prefix_load.py, structured_load.py) share: a JSON POST to a server, and the
events of a streamed (server-sent events) reply. Standard library only."""
import http.client, json, time, urllib.parse


def post(url, path, body):
    """POST `body` as JSON to `path` on `url`'s host and port: (connection, response, the time just
    before the request was sent) of a 200 reply; any other status raises RuntimeError."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    return c, r, t0


def events(r):
    """Each `data:` event of streamed reply `r`, parsed, until `data: [DONE]` or the end."""
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        yield json.loads(data)
