"""The evaluator role (``heloco-peer join --evaluator``): any peer, a CPU-only one too, measures
the global model's validation loss per language every few seconds and publishes it as a signed
DHT record with a short history (``swarm/records.py``, ``EvalRecord``), so that the monitor, the
dashboard and anyone else see "how is Russian doing" in a real run, not only on a testnet.

The languages are the ones given (``--eval-regions``) or else every region a live peer trains,
plus the evaluator's own; validation blocks of a language are built once, when it first appears.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable

import torch

from heloco_p2p.data import open_source, validation_blocks
from heloco_p2p.local import evaluate_regions
from heloco_p2p.local.solo import source_spec
from heloco_p2p.roles.joining import JoinError, download_state, tensor_layout
from heloco_p2p.swarm.records import EvalRecord

logger = logging.getLogger(__name__)


class Evaluator:
    """Validation loss of a θ per language, and the record that publishes it.

    :param model: a model of the run's shape (its parameters are overwritten by ``load``)
    :param load: ``load(params)`` puts a θ into ``model``
    :param regions: the languages to evaluate; None: those the swarm trains (``regions_for``)
    """

    def __init__(self, model: torch.nn.Module, load: Callable[[list[torch.Tensor]], None], cfg, tokenizer,
                 regions: list[str] | None = None, own_region: str | None = None, history: int = 32):
        self.model, self.load, self.cfg, self.tokenizer = model, load, cfg, tokenizer
        self.fixed = list(regions) if regions else None
        self.own_region = own_region
        self.blocks: dict[str, torch.Tensor] = {}
        self.history: deque = deque(maxlen=history)  # (version, time, mean, {region: loss})

    def regions_for(self, trained: Iterable[str]) -> list[str]:
        if self.fixed is not None:
            return self.fixed
        return sorted(set(trained) | ({self.own_region} if self.own_region else set()))

    def _blocks(self, region: str) -> torch.Tensor | None:
        if region not in self.blocks:
            try:
                source = open_source(source_spec(self.cfg, region))
                self.blocks[region] = validation_blocks(source, self.tokenizer, self.cfg.data.seq_len,
                                                        self.cfg.data.val_blocks)
            except Exception as exc:  # a region this machine has no corpus for: say so once, skip it
                logger.warning("evaluator: no validation data for region %r (%s); skipping it", region, exc)
                self.blocks[region] = None
        return self.blocks[region]

    def evaluate(self, params: list[torch.Tensor], version: int, regions: Iterable[str], now: float | None = None) -> dict:
        """``{"version", "time", "mean", "per_language"}`` for ``params`` (at global ``version``)."""
        blocks = {r: b for r in regions if (b := self._blocks(r)) is not None}
        if not blocks:
            raise ValueError("no language to evaluate: give --eval-regions with regions of the built-in corpus")
        with torch.no_grad():
            self.load(params)
        result = evaluate_regions(self.model, blocks)
        point = {"version": version, "time": time.time() if now is None else now, "mean": float(result["mean"]),
                 "per_language": {r: float(v) for r, v in result["per_language"].items()}}
        self.history.append(point)
        return point

    def record(self, peer_id: str, name: str) -> EvalRecord:
        """The DHT record of the latest evaluation and the history before it (oldest first)."""
        last = self.history[-1]
        return EvalRecord(peer_id=peer_id, name=name, version=last["version"], time=last["time"], mean=last["mean"],
                          losses=last["per_language"], history_versions=[p["version"] for p in self.history],
                          history_times=[p["time"] for p in self.history],
                          history_means=[p["mean"] for p in self.history],
                          history_losses=[p["per_language"] for p in self.history])


def evaluate_forever(ev: Evaluator, node, election, name: str, every: float, stop_event: threading.Event,
                     keep_going: Callable[[], bool], log_metric: Callable[[dict], None],
                     download: Callable[[], tuple] | None = None) -> None:
    """The evaluator's loop: every ``every`` seconds, the global θ (never θ̄: ``model="theta"``,
    from the coordinator or a standby) evaluated per language and published in the DHT.
    ``download``: ``() -> (θ, version)`` instead (a sharded run: θ merged from every shard)."""
    expected = tensor_layout(list(ev.model.parameters()))
    while not stop_event.is_set() and keep_going():
        t0 = time.time()
        try:
            if download is None:
                params, header, _ = download_state(node, election, expected, stop_event, model="theta")
                version = int(header["version"])
            else:
                params, version = download()
            regions = ev.regions_for(p.region for p in election.live_peers() if p.role != "evaluator")
            point = ev.evaluate(params, version, regions)
            node.records.publish_eval(ev.record(node.peer_id, name), ttl=max(4 * every, 300.0))
            log_metric({"event": "eval", "version": point["version"],
                        "val_loss": {"mean": point["mean"], "per_language": point["per_language"]}})
            logger.info("evaluated version %d: mean %.3f (%s)", point["version"], point["mean"],
                        ", ".join(f"{r} {v:.2f}" for r, v in sorted(point["per_language"].items())))
        except (JoinError, ValueError) as exc:
            logger.warning("evaluation failed: %s", exc)
        stop_event.wait(max(0.0, every - (time.time() - t0)))
