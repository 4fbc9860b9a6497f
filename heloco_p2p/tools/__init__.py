"""What people run around a swarm rather than in it: the web dashboard (``dashboard.py``: a page,
JSON and Prometheus metrics read from the run's DHT records) and the pre-flight ``doctor``
(``doctor.py``: can this machine join, and how well). They sit above the protocol: they read
records and call peers' public RPCs, and nothing in the protocol imports them."""
