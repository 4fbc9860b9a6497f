"""``heloco-peer join``: take part in a run (or start one with --config)."""
from __future__ import annotations

import sys

import click

from heloco_p2p.cli import log_level_option
from heloco_p2p.config import ConfigError


@click.command()
@click.option("--run-id", required=True, help="The run's name; peers of one run share it.")
@click.option("--initial-peers", multiple=True, help="Multiaddr of a peer already in the swarm (repeatable).")
@click.option("--config", "config_path", default=None, help="Run config; only the first peer of a run needs it.")
@click.option("--region", default="en", show_default=True, help="This peer's region / language.")
@click.option("--name", default="", help="A readable name for the monitor (default: end of the peer id).")
@click.option("--identity", type=click.Path(file_okay=False), default=None,
              help="Directory for this peer's persistent identity (libp2p key and DHT record key).")
@click.option("--host-maddrs", multiple=True, default=["/ip4/127.0.0.1/tcp/0"], show_default=True,
              help="Addresses to listen on, e.g. /ip4/0.0.0.0/tcp/31337.")
@click.option("--announce-maddrs", multiple=True, help="Addresses others should dial (behind NAT or port forwarding).")
@click.option("--client-mode", is_flag=True, help="Do not accept incoming connections (behind NAT).")
@click.option("--no-train", is_flag=True, help="Serve (coordinator, standby, state) without training.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None, help="Where the coordinator writes checkpoints.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="Restart the run from this checkpoint directory when no peer holds newer state "
                   "(also the default --checkpoint-dir).")
@click.option("--max-rounds", type=click.IntRange(min=1), default=None, help="Leave after this many rounds.")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="Leave after this many minutes.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: torch's default).")
@click.option("--speed", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Emulate slower hardware: idle (1/speed - 1) x step time after each step.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="This peer's inner batch size (default: the run's).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:1, ... (default: the run's, usually auto).")
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), default=None, help="Append JSON lines (rounds, commits) here.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for this peer's data order.")
@click.option("--overlap/--no-overlap", default=None,
              help="Train the next round while a submission travels (default: the run's swarm.overlap).")
@click.option("--swarm-key-file", type=click.Path(dir_okay=False), default=None,
              help="The run's swarm key (make one with `heloco-peer keygen FILE`): only peers holding it can submit, "
                   "download state or coordinate. Every peer of a run uses the same file, or none.")
@click.option("--genesis-digest", default=None, metavar="PREFIX",
              help="Follow the run whose config digest starts with PREFIX when the DHT holds several genesis records "
                   "for RUN-ID (in an open run anyone can publish one). Without it the peers given with "
                   "--initial-peers decide; `heloco-peer doctor` prints the run's digest.")
@click.option("--evaluator", is_flag=True,
              help="Do not train: evaluate the global model per language every --eval-every seconds and publish it "
                   "in the DHT (monitor and dashboard show it). Any machine can do it, a CPU-only one too.")
@click.option("--eval-every", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="--evaluator: seconds between evaluations.")
@click.option("--eval-regions", default=None,
              help="--evaluator: comma-separated languages (default: every region a live peer trains, and --region).")
@click.option("--join-sources", type=click.IntRange(min=1, max=64), default=None,
              help="Peers to download the state's parts from at once (coordinator, standbys, peers at the same "
                   "version; default 4).")
@click.option("--join-part-mb", type=click.FloatRange(min=0.1, max=1024), default=None,
              help="MB of the (fp16) state per part when downloading it (default 16); a part lost with its peer "
                   "is fetched again from another.")
@log_level_option
def join(run_id, resume_dir, initial_peers, config_path, region, name, identity, host_maddrs, announce_maddrs, client_mode, no_train,
         checkpoint_dir, max_rounds, max_minutes, threads, speed, batch_size, device, metrics_path, seed, overlap, swarm_key_file,
         genesis_digest, evaluator, eval_every, eval_regions, join_sources, join_part_mb):
    """Join run RUN-ID: fetch its config, tokenizer and state from peers, then train and submit."""
    from heloco_p2p.peer import JoinError, Peer, PeerOptions  # loads transformers (~2 s): only for this command

    opts = PeerOptions(run_id=run_id, resume=resume_dir, config=config_path, region=region, name=name, identity=identity,
                       initial_peers=list(initial_peers), host_maddrs=list(host_maddrs),
                       announce_maddrs=list(announce_maddrs) or None, client_mode=client_mode, no_train=no_train,
                       checkpoint_dir=checkpoint_dir, max_rounds=max_rounds, max_minutes=max_minutes, threads=threads,
                       seed=seed, speed=speed, batch_size=batch_size, device=device, metrics_path=metrics_path,
                       overlap=overlap, swarm_key_file=swarm_key_file, genesis_digest=genesis_digest, evaluator=evaluator, eval_every=eval_every,
                       eval_regions=[r.strip() for r in eval_regions.split(",") if r.strip()] if eval_regions else None,
                       **{k: v for k, v in (("join_sources", join_sources), ("join_part_mb", join_part_mb)) if v is not None})
    peer = Peer(opts)
    peer.install_signal_handlers()
    code = 0
    try:
        peer.start()
        click.echo(f"peer {peer.name} ({peer.node.peer_id}) in run {run_id}; join with:\n  heloco-peer join --run-id "
                   f"{run_id} " + " ".join(f"--initial-peers {m}" for m in peer.node.visible_maddrs()), err=True)
        peer.train_loop()
    except (JoinError, ConfigError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        code = 2
    except KeyboardInterrupt:
        pass
    finally:
        peer.leave()
    sys.exit(code)
