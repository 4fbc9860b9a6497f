"""The protocol: what a peer does in a run, above the transport of ``swarm/``.

``lease``: THE lease-belief rule (pure functions), used by the peer, the monitor,
the testnet evaluator and scripts alike, so that no two readers can believe different
coordinators. ``peer.py`` builds the objects below and wires them; nothing here imports it.

One owner thread per mutable object
-----------------------------------
The rule: each piece of mutable state has one thread that writes it; other threads read it, or
reach it through an explicit hand-off object. The threads of a peer process:

- the training thread (the main thread: ``Peer.start``, then ``train_loop``, then ``leave``);
- the node's event loop (``swarm-loop``, ``swarm/node.py``): every RPC handler, and every
  coroutine another thread hands it with ``SwarmNode.run``;
- executors: the loop's default pool, for the CPU work of a handler (decode, ``CommitState``
  check and apply, digests, encoding), always awaited by the coroutine that started it;
- the maintenance thread (``maintenance.Maintenance``) and the lease thread
  (``Election.renew_loop``, with up to 3 ``renew`` pool threads writing the claim);
- the ``submit`` thread of overlapped rounds (``rounds.InFlight``: one at a time);
- with ``swarm.shards`` > 1: one lease thread per shard (``lease-<k>``), and the ``shard-submit``
  pool of ``shard_submit.ShardedSubmit`` (one thread per shard, one part in flight per shard).

Sharded runs (roles/shards.py): every object below exists once per shard (``peer.ShardStack``),
each owned as described, each reaching the node through its ``shard_node.ShardNode``; the
peer's ``global_params`` / ``version`` (a tuple of shard versions) are written only by the
thread that submits, from the outcomes ``ShardedSubmit.submit`` returns (its pool threads only
send and return outcomes; their per-shard carry state is touched under ``submit`` only).

Owners (and, where the code does not follow the rule yet, who else writes):

- ``CommitState`` (commit_state.py): the event loop, under ``CoordinatorService.lock``, with the
  work in executor jobs the lock holder awaits. Others: ``activate`` sets its term (see below);
  ``Checkpoints.restore`` loads a checkpoint on the training thread before the maintenance thread
  starts. Readers copy under the lock (``StateServer``, the checkpoint snapshot).
- ``CoordinatorService`` (coordinator.py) and its parts ``TermState`` (term.py), ``Replication``
  (replication.py), ``StandbyService`` (standby.py) and ``SyncBarrier`` (barrier.py): the event
  loop (submit, replicate, handover, recruit, ``hand_over``, the barrier). Others: ``activate``
  from the training thread (founding, ``--resume``) and the maintenance thread (a standby's
  takeover in ``Election.watch``, which also sets ``Replication.standbys``);
  ``Replication.others_alive`` and ``SyncBarrier.participants`` from the maintenance thread;
  ``TermState.renewed`` from the lease thread; ``TermState.note_term``/``step_down`` from
  whichever thread reads the lease.
- ``DownlinkWindow`` (swarm/downlink.py, ``CoordinatorService.downlink`` with ``wrap8`` replies):
  the event loop, under the commit lock, with the work in executor jobs the lock holder awaits
  (the version's payload is built beside the replication and awaited before the lock is released).
- ``CommitLog`` (commit_log.py, part of ``CommitState``): appended on the event loop under the
  commit lock; the maintenance thread reads a copy (``up_to``) to publish it.
- ``Election`` (election.py): ``lease`` and ``run_tokens`` under its lease lock by any thread that
  reads the lease (``refresh``; ``publish`` and ``Peer._submit`` write them without it). ``role``:
  the maintenance thread (``watch``; holding the coordinator role), and also the training thread
  (joining, catching up), the submit thread (catching up), the lease thread (a coordinator that
  finds its lease lost) and an executor (a takeover by handover).
- ``RoundLoop``, ``InnerTrainer`` and the model: the training thread. The heartbeat reads the
  loop's numbers (``rounds``, ``steps_per_second``, ``last_loss``).
- ``SubmitClient``, ``SubmitTally`` (tally.py) and the peer's ``global_params`` / ``version``
  (``Peer._adopt``): the thread that submits, the training thread or the one ``submit`` thread
  in flight. ``Peer.held()`` reads θ and its version (two attributes: for an instant a reader
  can see the new θ with the old version); the heartbeat reads the tally's counts.
- ``RoundSchedule`` (schedule.py): the training thread; ``time_left`` is read by any thread.
- ``Maintenance`` and ``Checkpoints.maybe_write``: the maintenance thread; ``leave`` writes the
  last checkpoint and withdraws the record after joining it (for at most 5 s).
- ``MetricsLog`` (metrics.py): every thread appends; its lock keeps each line whole.

Hand-offs between threads:

- ``InFlight`` (rounds.py): the submit thread hands the θ a submission ends with to the training
  thread, which folds it in at a step boundary;
- ``Replication.snapshot``: (term, version, digest, tokens) of the last replicated commit,
  one tuple written under the commit lock and read by the lease thread without it, so a renewal
  never waits for a commit; ``lease_until`` / ``lease_valid()`` the other way: commits are
  acknowledged only while the lease the lease thread renewed surely holds (``TermState``);
- ``SwarmNode.run(coroutine)``: another thread's way to act on state the event loop owns
  (recruiting a standby, the sync barrier, the checkpoint snapshot under the lock, ``hand_over``);
- ``Election.lease``: the lease believed, read by the submit client and the handlers;
- the peer's ``stop_event``: set by a signal or ``leave``, read by every loop.
"""
