"""An example Python filter (filters.python): requests must carry an API key found in a
file, one key per line (blank lines and `#` comments ignored).

    filters:
      - python: meshproxy.examples.api_key:ApiKeyCheck
        config: {keys_file: /etc/meshproxy/api-keys, header: x-api-key}

A request without a known key is answered 401 here and never reaches the upstream; one
with a key goes on without it (the key is a credential for the edge, not for the
services behind it), and says which key's owner it was in `x-api-client` when the file
names one (`key owner` per line). The file is read when the filter is built, so a config
reload (SIGHUP, /reload) picks up a changed file.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from meshproxy.filters.python import Reply, Request


class ApiKeyCheck:
    def __init__(self, config: dict[str, Any]) -> None:
        self.header = str(config.get("header", "x-api-key"))
        self.keys: dict[str, str] = {}
        for line in Path(str(config["keys_file"])).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, owner = line.partition(" ")
                self.keys[key] = owner.strip()

    def on_request_headers(self, req: Request) -> Reply | None:
        given = req.headers.get(self.header)
        owner = None
        if given is not None:
            for key, who in self.keys.items():
                if hmac.compare_digest(key.encode(), given.encode()):  # constant time
                    owner = who
                    break
            else:
                given = None
        if given is None:
            return Reply(401, "a valid API key is required\n",
                         headers=[("www-authenticate", f'ApiKey header="{self.header}"')])
        req.headers.remove(self.header)
        if owner:
            req.headers.set("x-api-client", owner)
        return None
