"""What people run around a swarm rather than in it: the local testnet (``testnet.py``) and the
local-swarm launcher it and the tests use (``launcher.py``: real peers as processes on 127.0.0.1),
the terminal monitor (``monitor.py``), the web dashboard (``dashboard.py``: a page, JSON and
Prometheus metrics read from the run's DHT records), the pre-flight ``doctor`` (``doctor.py``: can
this machine join, and how well), the checkpoint export (``export.py``) and the reports
(``report.py``). They sit above the protocol: they read records and call peers' public RPCs, and
nothing in the protocol imports them."""
