"""The protocol: what a peer does in a run, above the transport of ``swarm/``.

``lease``: term state and THE lease-belief rule (pure functions), used by the peer, the monitor,
the testnet evaluator and scripts alike, so that no two readers can believe different
coordinators.
"""
