"""``python -m heloco_p2p`` is ``heloco-peer``."""
from heloco_p2p.cli import main

main()
