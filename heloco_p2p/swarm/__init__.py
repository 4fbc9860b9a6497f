"""hivemind glue: DHT records with schemas and signatures, the node (P2P + DHT + RPC handlers),
the wire format for tensors, and process lifetime. Moves tensors and records; does not train and
does not do outer math."""
