"""What a downstream connection is waiting for; tells a fired timeout what to answer."""

PH_IDLE = 0        # keep-alive, between requests
PH_HEAD = 1        # reading a request head (request_headers_timeout)
PH_REQ_BODY = 2    # reading the request body from the client
PH_UPSTREAM = 3    # waiting for the upstream's response head (route timeout)
PH_RESP_BODY = 4   # relaying the response body (route timeout)
PH_TUNNEL = 5      # an upgraded (WebSocket) connection relayed as bytes
PH_TCP = 6         # an intercepted connection proxied as TCP (proxy.tcp_proxy)
