"""heloco-p2p: decentralized volunteer training of language models with HeLoCo over hivemind."""

__version__ = "0.1.0"
