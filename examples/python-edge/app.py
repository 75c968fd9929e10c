"""An edge function in Python, run as a pod: a WASI 0.2 command component made by componentize-py.

It answers one request, given the way a CGI-style edge runtime would: REQUEST_PATH and
REQUEST_QUERY in its environment; the answer is one JSON line on stdout (the container's log)."""
import json
import os
import sys
import urllib.parse

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        query = dict(urllib.parse.parse_qsl(os.environ.get("REQUEST_QUERY", "")))
        body = {"path": os.environ.get("REQUEST_PATH", "/"), "hello": query.get("name", "world"),
                "python": sys.version.split()[0], "platform": sys.platform}
        print(json.dumps({"status": 200, "body": body}, sort_keys=True))
